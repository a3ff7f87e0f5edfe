//! How a member's status travels in gossip: one small string value per key.
//!
//! chitchat replicates key-value pairs and sends only changed keys, so the status is split into
//! many short keys, and every number is quantised before it is published ([`quantise_gpu`],
//! [`quantise_wait_s`], prices in tenths of a cent): an unchanged reading then sets the same
//! string, which chitchat treats as a no-op (no version bump, no traffic).
//!
//! Keys (values are UTF-8 text):
//!
//! | key | value |
//! | --- | --- |
//! | `role` | `node` or `coordinator` (required) |
//! | `state` | a [`MemberState`] (required) |
//! | `version` | kilnd's version (required) |
//! | `addr` | the gossip address as `scheme://ip:port` |
//! | `api` | the HTTP API URL |
//! | `provider`, `instance` | where the host is rented |
//! | `price_mills` | USD per hour in tenths of a cent (integer) |
//! | `run` | jobs running (integer) |
//! | `q.<tier>` | `<queued>` or `<queued>,<oldest wait s>` for each tier, always present on nodes |
//! | `gpu.note` | why there are no GPU readings |
//! | `gpu.count` | number of GPUs published |
//! | `gpu.<i>.name`, `gpu.<i>.uuid` | text |
//! | `gpu.<i>.util`, `gpu.<i>.memutil` | percent (integer) |
//! | `gpu.<i>.mem` | `<used MiB>/<total MiB>` (either side may be empty) |
//! | `gpu.<i>.temp` | °C |
//! | `gpu.<i>.power` | `<W>/<limit W>` (either side may be empty) |
//! | `gpu.<i>.procs` | compute processes |
//! | `net.<scheme>` | another address this member accepts connections on (e.g. `net.tcp`) |
//!
//! A member is live in Kiln's view only once its required keys exist (it may have joined the
//! gossip a moment before it published them). Absent optional fields are absent keys.

use std::collections::BTreeMap;
use std::str::FromStr;

use super::Tier;
use super::cluster::{GpuStatus, MemberState, MemberStatus, Role, TierQueue};

pub const KEY_ROLE: &str = "role";
pub const KEY_STATE: &str = "state";
pub const KEY_VERSION: &str = "version";
pub const KEY_ADDR: &str = "addr";
pub const KEY_API: &str = "api";
pub const KEY_PROVIDER: &str = "provider";
pub const KEY_INSTANCE: &str = "instance";
pub const KEY_PRICE: &str = "price_mills";
pub const KEY_RUNNING: &str = "run";
pub const KEY_GPU_NOTE: &str = "gpu.note";
pub const KEY_GPU_COUNT: &str = "gpu.count";
/// Prefix of the per-tier queue keys (`q.free`, …).
pub const PREFIX_QUEUE: &str = "q.";
/// Prefix of the per-GPU keys (`gpu.0.util`, …).
pub const PREFIX_GPU: &str = "gpu.";
/// Prefix of alternative transport addresses (`net.tcp`).
pub const PREFIX_NET: &str = "net.";

/// The keys without which a member is not yet part of the view.
pub const REQUIRED_KEYS: [&str; 3] = [KEY_ROLE, KEY_STATE, KEY_VERSION];

/// Every key prefix the status encoding owns; a publisher deletes keys under these that a new
/// encoding no longer has (e.g. a GPU field that became unsupported).
pub const OWNED_PREFIXES: [&str; 2] = [PREFIX_QUEUE, PREFIX_GPU];

/// Whether `key` belongs to the status encoding (so a publisher may delete it when a new
/// encoding no longer has it). Keys outside these belong to other protocols.
pub fn is_status_key(key: &str) -> bool {
    const TOP: [&str; 11] = [
        KEY_ROLE,
        KEY_STATE,
        KEY_VERSION,
        KEY_ADDR,
        KEY_API,
        KEY_PROVIDER,
        KEY_INSTANCE,
        KEY_PRICE,
        KEY_RUNNING,
        KEY_GPU_NOTE,
        KEY_GPU_COUNT,
    ];
    TOP.contains(&key)
        || key.starts_with(PREFIX_QUEUE)
        || key.starts_with(PREFIX_GPU)
        || key.starts_with(PREFIX_NET)
}

/// A member's status, with its gossip address and alternative addresses, as key-value pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    pub status: MemberStatus,
    /// `scheme://ip:port` this member gossips on.
    pub addr: String,
    /// Other addresses by scheme (`tcp` → `tcp://…`).
    pub alternates: BTreeMap<String, String>,
}

/// Why a member's keys do not make a status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("key {0:?} is missing")]
    Missing(&'static str),
    #[error("key {key:?} has an invalid value {value:?}")]
    Invalid { key: String, value: String },
}

/// The GPU fields quantised for gossip (so that noise does not create versions).
pub fn quantise_gpu(gpu: &GpuStatus) -> GpuStatus {
    fn step(v: Option<u32>, q: u32) -> Option<u32> {
        v.map(|v| (v + q / 2) / q * q)
    }
    GpuStatus {
        index: gpu.index,
        name: gpu.name.clone(),
        uuid: gpu.uuid.clone(),
        util_pct: step(gpu.util_pct, 5).map(|v| v.min(100)),
        mem_util_pct: step(gpu.mem_util_pct, 5).map(|v| v.min(100)),
        mem_used_mib: gpu.mem_used_mib.map(|v| (v + 32) / 64 * 64),
        mem_total_mib: gpu.mem_total_mib,
        temperature_c: step(gpu.temperature_c, 2),
        power_w: step(gpu.power_w, 10),
        power_limit_w: gpu.power_limit_w,
        processes: gpu.processes,
    }
}

/// Oldest-wait seconds quantised: exact under 10 s, then to 5 s.
pub fn quantise_wait_s(seconds: u64) -> u64 {
    if seconds < 10 {
        seconds
    } else {
        seconds / 5 * 5
    }
}

/// A price in USD per hour to tenths of a cent.
pub fn price_to_mills(usd_per_hour: f64) -> Option<u64> {
    if (0.0..1e9).contains(&usd_per_hour) {
        Some((usd_per_hour * 1000.0).round() as u64)
    } else {
        None
    }
}

pub fn mills_to_price(mills: u64) -> f64 {
    mills as f64 / 1000.0
}

fn pair(a: Option<impl ToString>, b: Option<impl ToString>) -> String {
    format!(
        "{}/{}",
        a.map(|v| v.to_string()).unwrap_or_default(),
        b.map(|v| v.to_string()).unwrap_or_default()
    )
}

/// Encodes a published status as gossip key-value pairs. Values must already be quantised
/// (the cluster module does it); the encoding itself is exact.
pub fn encode(published: &Published) -> BTreeMap<String, String> {
    let status = &published.status;
    let mut kv = BTreeMap::new();
    let mut put = |k: String, v: String| {
        kv.insert(k, v);
    };
    put(KEY_ROLE.into(), status.role.as_str().into());
    put(KEY_STATE.into(), status.state.as_str().into());
    put(KEY_VERSION.into(), status.version.clone());
    put(KEY_ADDR.into(), published.addr.clone());
    for (scheme, addr) in &published.alternates {
        put(format!("{PREFIX_NET}{scheme}"), addr.clone());
    }
    if let Some(api) = &status.api_url {
        put(KEY_API.into(), api.clone());
    }
    if let Some(provider) = &status.provider {
        put(KEY_PROVIDER.into(), provider.clone());
    }
    if let Some(instance) = &status.instance_id {
        put(KEY_INSTANCE.into(), instance.clone());
    }
    if let Some(mills) = status.price_per_hour.and_then(price_to_mills) {
        put(KEY_PRICE.into(), mills.to_string());
    }
    if status.role == Role::Node {
        put(KEY_RUNNING.into(), status.running.to_string());
        for tier in Tier::BY_PRIORITY {
            let q = status.queue.get(&tier).copied().unwrap_or_default();
            let value = match q.oldest_wait_s {
                Some(oldest) => format!("{},{oldest}", q.queued),
                None => q.queued.to_string(),
            };
            put(format!("{PREFIX_QUEUE}{tier}"), value);
        }
    }
    if let Some(note) = &status.gpu_note {
        put(KEY_GPU_NOTE.into(), note.clone());
    }
    if status.role == Role::Node || !status.gpus.is_empty() {
        put(KEY_GPU_COUNT.into(), status.gpus.len().to_string());
    }
    for (i, gpu) in status.gpus.iter().enumerate() {
        let key = |field: &str| format!("{PREFIX_GPU}{i}.{field}");
        if let Some(name) = &gpu.name {
            put(key("name"), name.clone());
        }
        if let Some(uuid) = &gpu.uuid {
            put(key("uuid"), uuid.clone());
        }
        if let Some(v) = gpu.util_pct {
            put(key("util"), v.to_string());
        }
        if let Some(v) = gpu.mem_util_pct {
            put(key("memutil"), v.to_string());
        }
        if gpu.mem_used_mib.is_some() || gpu.mem_total_mib.is_some() {
            put(key("mem"), pair(gpu.mem_used_mib, gpu.mem_total_mib));
        }
        if let Some(v) = gpu.temperature_c {
            put(key("temp"), v.to_string());
        }
        if gpu.power_w.is_some() || gpu.power_limit_w.is_some() {
            put(key("power"), pair(gpu.power_w, gpu.power_limit_w));
        }
        if let Some(v) = gpu.processes {
            put(key("procs"), v.to_string());
        }
        if gpu.index != i as u32 {
            put(key("index"), gpu.index.to_string());
        }
    }
    kv
}

fn parse<T: FromStr>(key: &str, value: &str) -> Result<T, DecodeError> {
    value.parse().map_err(|_| DecodeError::Invalid {
        key: key.to_string(),
        value: value.to_string(),
    })
}

fn parse_pair<T: FromStr>(key: &str, value: &str) -> Result<(Option<T>, Option<T>), DecodeError> {
    let (a, b) = value.split_once('/').ok_or_else(|| DecodeError::Invalid {
        key: key.to_string(),
        value: value.to_string(),
    })?;
    let side = |s: &str| {
        if s.is_empty() {
            Ok(None)
        } else {
            parse(key, s).map(Some)
        }
    };
    Ok((side(a)?, side(b)?))
}

/// Decodes a member's key-value pairs (as gossip holds them) into its published status. `name`
/// is the member's node id. Unknown keys are ignored (newer members may publish more).
pub fn decode<'a>(
    name: &str,
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Published, DecodeError> {
    let kv: BTreeMap<&str, &str> = pairs.into_iter().collect();
    let get = |k: &'static str| kv.get(k).copied();
    let required = |k: &'static str| get(k).ok_or(DecodeError::Missing(k));
    let role: Role = parse(KEY_ROLE, required(KEY_ROLE)?)?;
    let state: MemberState = parse(KEY_STATE, required(KEY_STATE)?)?;
    let version = required(KEY_VERSION)?.to_string();
    let mut queue = BTreeMap::new();
    for tier in Tier::BY_PRIORITY {
        let key = format!("{PREFIX_QUEUE}{tier}");
        if let Some(value) = kv.get(key.as_str()) {
            let q = match value.split_once(',') {
                Some((queued, oldest)) => TierQueue {
                    queued: parse(&key, queued)?,
                    oldest_wait_s: Some(parse(&key, oldest)?),
                },
                None => TierQueue {
                    queued: parse(&key, value)?,
                    oldest_wait_s: None,
                },
            };
            if q.queued > 0 || q.oldest_wait_s.is_some() {
                queue.insert(tier, q);
            }
        }
    }
    let gpu_count: usize = match get(KEY_GPU_COUNT) {
        Some(v) => parse(KEY_GPU_COUNT, v)?,
        None => 0,
    };
    // A corrupt count must not make us allocate or loop without bound.
    if gpu_count > 64 {
        return Err(DecodeError::Invalid {
            key: KEY_GPU_COUNT.into(),
            value: gpu_count.to_string(),
        });
    }
    let mut gpus = Vec::with_capacity(gpu_count);
    for i in 0..gpu_count {
        let key = |field: &str| format!("{PREFIX_GPU}{i}.{field}");
        let field = |field: &str| kv.get(key(field).as_str()).copied();
        let number = |f: &str| -> Result<Option<u32>, DecodeError> {
            field(f).map(|v| parse(&key(f), v)).transpose()
        };
        let (mem_used_mib, mem_total_mib) = match field("mem") {
            Some(v) => parse_pair::<u64>(&key("mem"), v)?,
            None => (None, None),
        };
        let (power_w, power_limit_w) = match field("power") {
            Some(v) => parse_pair::<u32>(&key("power"), v)?,
            None => (None, None),
        };
        gpus.push(GpuStatus {
            index: number("index")?.unwrap_or(i as u32),
            name: field("name").map(str::to_string),
            uuid: field("uuid").map(str::to_string),
            util_pct: number("util")?,
            mem_util_pct: number("memutil")?,
            mem_used_mib,
            mem_total_mib,
            temperature_c: number("temp")?,
            power_w,
            power_limit_w,
            processes: number("procs")?,
        });
    }
    let alternates = kv
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(PREFIX_NET)
                .map(|scheme| (scheme.to_string(), v.to_string()))
        })
        .collect();
    let status = MemberStatus {
        name: name.to_string(),
        role,
        state,
        api_url: get(KEY_API).map(str::to_string),
        version,
        provider: get(KEY_PROVIDER).map(str::to_string),
        instance_id: get(KEY_INSTANCE).map(str::to_string),
        price_per_hour: get(KEY_PRICE)
            .map(|v| parse::<u64>(KEY_PRICE, v))
            .transpose()?
            .map(mills_to_price),
        gpu_note: get(KEY_GPU_NOTE).map(str::to_string),
        gpus,
        queue,
        running: get(KEY_RUNNING)
            .map(|v| parse(KEY_RUNNING, v))
            .transpose()?
            .unwrap_or(0),
    };
    Ok(Published {
        status,
        addr: get(KEY_ADDR).unwrap_or_default().to_string(),
        alternates,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn text() -> impl Strategy<Value = String> {
        // Any printable text, including the separators the encoding uses.
        "[ -~]{0,24}"
    }

    fn gpu(index: u32) -> impl Strategy<Value = GpuStatus> {
        (
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(0u32..=100),
            proptest::option::of(0u32..=100),
            proptest::option::of(0u64..200_000),
            proptest::option::of(0u64..200_000),
            proptest::option::of(0u32..120),
            proptest::option::of(0u32..1000),
            proptest::option::of(0u32..1000),
            proptest::option::of(0u32..64),
        )
            .prop_map(
                move |(name, uuid, util, memutil, used, total, temp, power, limit, procs)| {
                    quantise_gpu(&GpuStatus {
                        index,
                        name,
                        uuid,
                        util_pct: util,
                        mem_util_pct: memutil,
                        mem_used_mib: used,
                        mem_total_mib: total,
                        temperature_c: temp,
                        power_w: power,
                        power_limit_w: limit,
                        processes: procs,
                    })
                },
            )
    }

    fn published() -> impl Strategy<Value = Published> {
        let queue = proptest::collection::btree_map(
            prop_oneof![
                Just(Tier::Free),
                Just(Tier::Premium),
                Just(Tier::Pro),
                Just(Tier::Enterprise)
            ],
            (1u64..100_000, proptest::option::of(0u64..1_000_000)).prop_map(|(queued, oldest)| {
                TierQueue {
                    queued,
                    oldest_wait_s: oldest.map(quantise_wait_s),
                }
            }),
            0..4,
        );
        (
            "[a-z0-9][a-z0-9.-]{0,20}",
            prop_oneof![Just(Role::Node), Just(Role::Coordinator)],
            proptest::sample::select(MemberState::ALL.to_vec()),
            proptest::option::of(text()),
            text(),
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(0u64..100_000),
            proptest::option::of(text()),
            (0usize..3).prop_flat_map(|n| (0..n as u32).map(gpu).collect::<Vec<_>>()),
            (
                queue,
                0u32..8,
                proptest::collection::btree_map("[a-z]{1,5}", text(), 0..2),
            ),
        )
            .prop_map(
                |(
                    name,
                    role,
                    state,
                    api_url,
                    version,
                    provider,
                    instance_id,
                    price,
                    gpu_note,
                    gpus,
                    (queue, running, alternates),
                )| {
                    let node = role == Role::Node;
                    Published {
                        status: MemberStatus {
                            name,
                            role,
                            state,
                            api_url,
                            version,
                            provider,
                            instance_id,
                            price_per_hour: price.map(mills_to_price),
                            gpu_note,
                            gpus: if node { gpus } else { Vec::new() },
                            queue: if node { queue } else { BTreeMap::new() },
                            running: if node { running } else { 0 },
                        },
                        addr: "quic://10.0.0.1:7946".into(),
                        alternates,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn round_trip(published in published()) {
            let kv = encode(&published);
            let decoded = decode(
                &published.status.name,
                kv.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            );
            prop_assert_eq!(decoded, Ok(published));
        }

        #[test]
        fn garbage_never_panics(pairs in proptest::collection::vec(("[a-z.0-9]{0,12}", "[ -~]{0,12}"), 0..20)) {
            let _ = decode("x", pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }

        #[test]
        fn quantisation_is_idempotent(g in gpu(0)) {
            prop_assert_eq!(quantise_gpu(&g), g);
        }
    }

    #[test]
    fn required_keys_make_a_member() {
        let err = decode("n", [("role", "node"), ("state", "ready")]);
        assert_eq!(err, Err(DecodeError::Missing("version")));
        let bad = decode("n", [("role", "gpu"), ("state", "ready"), ("version", "1")]);
        assert!(matches!(bad, Err(DecodeError::Invalid { .. })));
        let huge = decode(
            "n",
            [
                ("role", "node"),
                ("state", "ready"),
                ("version", "1"),
                ("gpu.count", "100000000"),
            ],
        );
        assert!(matches!(huge, Err(DecodeError::Invalid { .. })));
    }

    #[test]
    fn small_changes_do_not_change_the_encoding() {
        let reading = |util, temp| GpuStatus {
            index: 0,
            util_pct: Some(util),
            temperature_c: Some(temp),
            mem_used_mib: Some(9_800),
            ..GpuStatus::default()
        };
        assert_eq!(
            quantise_gpu(&reading(96, 69)),
            quantise_gpu(&reading(97, 70))
        );
        assert_ne!(
            quantise_gpu(&reading(50, 70)),
            quantise_gpu(&reading(97, 70))
        );
        assert_eq!(quantise_wait_s(7), 7);
        assert_eq!(quantise_wait_s(44), 40);
    }
}
