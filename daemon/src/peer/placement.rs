//! Where an account's jobs live: rendezvous (highest random weight) hashing of the account over
//! the live, ready GPU members. Pure: no I/O, no clock, no randomness.
//!
//! Each member's weight for an account is `sha256(account || 0x00 || member)`, compared as a
//! big-endian 256-bit number; the heaviest member owns the account's new jobs and the next one
//! holds the replica. When a member leaves, only the accounts it owned get a new owner (the
//! rest keep theirs); when one joins, it takes about `1/n` of the accounts.
//!
//! This module must never depend on the order the members are given in, and never on anything
//! but the account and the member names.

use sha2::{Digest, Sha256};

/// A member's weight for an account: `sha256(account || 0x00 || member)`.
pub fn weight(account: &str, member: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(account.as_bytes());
    hasher.update([0u8]);
    hasher.update(member.as_bytes());
    hasher.finalize().into()
}

/// The members ordered by weight for `account`, heaviest first; duplicates appear once.
/// Ties (equal digests, which sha256 makes practically impossible) are broken by name.
pub fn rank<'a, S: AsRef<str>>(account: &str, members: &'a [S]) -> Vec<&'a str> {
    let mut weighted: Vec<([u8; 32], &'a str)> = members
        .iter()
        .map(|m| (weight(account, m.as_ref()), m.as_ref()))
        .collect();
    weighted.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    weighted.dedup_by(|a, b| a.1 == b.1);
    weighted.into_iter().map(|(_, m)| m).collect()
}

/// The owner of `account`'s new jobs and the member holding their replica: the first two of
/// [`rank`]. `(None, None)` with no members; no replica with one.
pub fn owner_and_replica<'a, S: AsRef<str>>(
    account: &str,
    members: &'a [S],
) -> (Option<&'a str>, Option<&'a str>) {
    let mut owner: Option<([u8; 32], &'a str)> = None;
    let mut replica: Option<([u8; 32], &'a str)> = None;
    let heavier = |a: &([u8; 32], &str), b: &([u8; 32], &str)| {
        a.0.cmp(&b.0).then_with(|| b.1.cmp(a.1)) == std::cmp::Ordering::Greater
    };
    for member in members {
        let candidate = (weight(account, member.as_ref()), member.as_ref());
        if owner.is_some_and(|o| o.1 == candidate.1) || replica.is_some_and(|r| r.1 == candidate.1)
        {
            continue;
        }
        match owner {
            Some(o) if !heavier(&candidate, &o) => {
                if replica.is_none_or(|r| heavier(&candidate, &r)) {
                    replica = Some(candidate);
                }
            }
            _ => {
                replica = owner;
                owner = Some(candidate);
            }
        }
    }
    (owner.map(|o| o.1), replica.map(|r| r.1))
}

/// How many members ranking after the asker [`key_holders`] names: the ownership changes
/// since a key was stored that a replay still finds it across.
pub const KEY_HOLDERS_AFTER: usize = 2;

/// Whom `me`, about to store a new job of `account` with an idempotency key, asks whether an
/// earlier job of the account already took that key: the members of `live` (every live GPU
/// member, ready or not; `me` may be among them) that rank ahead of `me` (owners that take no
/// jobs now, such as one that drains), and the first [`KEY_HOLDERS_AFTER`] that rank after
/// `me` (the owners before members joined ahead of them, or the replicas that adopted the jobs
/// of owners that have gone). Between them they recorded every key of the account as long as
/// ownership changed at most twice since it was stored: members that joined, or that drained
/// or died. Heaviest first.
pub fn key_holders<'a, S: AsRef<str>>(account: &str, live: &'a [S], me: &str) -> Vec<&'a str> {
    let mine = weight(account, me);
    let mut out = Vec::new();
    let mut after = 0;
    for member in rank(account, live) {
        if member == me {
            continue;
        }
        let ahead = weight(account, member)
            .cmp(&mine)
            .then_with(|| me.cmp(member))
            .is_gt();
        out.push(member);
        if !ahead {
            after += 1;
            if after == KEY_HOLDERS_AFTER {
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("gpu-{i:03}")).collect()
    }

    fn accounts(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("acct-{i:05}")).collect()
    }

    #[test]
    fn weight_is_the_documented_digest() {
        let mut hasher = Sha256::new();
        hasher.update(b"acme\0gpu-1");
        let expected: [u8; 32] = hasher.finalize().into();
        assert_eq!(weight("acme", "gpu-1"), expected);
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(weight("ab", "c"), weight("a", "bc"));
    }

    #[test]
    fn empty_and_single_member() {
        let none: [&str; 0] = [];
        assert_eq!(owner_and_replica("a", &none), (None, None));
        assert!(rank("a", &none).is_empty());
        assert_eq!(owner_and_replica("a", &["only"]), (Some("only"), None));
        assert_eq!(
            owner_and_replica("a", &["only", "only"]),
            (Some("only"), None)
        );
    }

    #[test]
    fn adding_a_member_moves_about_one_nth() {
        let accounts = accounts(2000);
        for n in [3usize, 5, 10] {
            let before = members(n);
            let mut after = before.clone();
            after.push("gpu-new".to_string());
            let moved = accounts
                .iter()
                .filter(|a| owner_and_replica(a, &before).0 != owner_and_replica(a, &after).0)
                .count();
            // Every moved account moved to the new member.
            for a in &accounts {
                let (old, new) = (
                    owner_and_replica(a, &before).0,
                    owner_and_replica(a, &after).0,
                );
                assert!(
                    old == new || new == Some("gpu-new"),
                    "{a}: {old:?} -> {new:?}"
                );
            }
            let share = moved as f64 / accounts.len() as f64;
            let expected = 1.0 / (n + 1) as f64;
            assert!(
                (0.5 * expected..=2.0 * expected).contains(&share),
                "n = {n}: {moved} of {} accounts moved",
                accounts.len()
            );
        }
    }

    #[test]
    fn load_is_spread() {
        let members = members(8);
        let mut owned = std::collections::HashMap::new();
        for a in accounts(2000) {
            *owned
                .entry(owner_and_replica(&a, &members).0.map(str::to_string))
                .or_insert(0usize) += 1;
        }
        assert_eq!(owned.len(), 8);
        for (member, count) in owned {
            assert!((125..=500).contains(&count), "{member:?} owns {count}");
        }
    }

    #[test]
    fn key_holders_are_those_ahead_and_the_next() {
        let all = members(6);
        for account in accounts(200) {
            let ranked = rank(&account, &all);
            for (i, me) in ranked.iter().enumerate() {
                let mut expected: Vec<&str> = ranked[..i].to_vec();
                expected.extend(ranked.iter().skip(i + 1).take(KEY_HOLDERS_AFTER));
                assert_eq!(key_holders(&account, &all, me), expected, "{account} {me}");
            }
            // A member not in the list (one that just joined) is placed by its weight.
            let newcomer = "gpu-new";
            let with: Vec<String> = all.iter().cloned().chain([newcomer.to_string()]).collect();
            assert_eq!(
                key_holders(&account, &all, newcomer),
                key_holders(&account, &with, newcomer),
                "{account}"
            );
        }
        let none: [&str; 0] = [];
        assert!(key_holders("a", &none, "me").is_empty());
        assert!(key_holders("a", &["me"], "me").is_empty());
    }

    proptest! {
        /// Whatever two changes followed the storing of a key (members joined, or drained or
        /// died, in any order), the owner of the account's new jobs asks a member that still
        /// keeps the key: the job's owner when it is live, else the replica that adopted it
        /// (each picks a new replica when its own has gone, as the owner does).
        #[test]
        fn after_two_changes_a_key_holder_is_asked(
            members in prop::collection::btree_set("[a-z0-9-]{1,12}", 2..10),
            changes in prop::collection::vec((0..3u8, "[a-z0-9-]{1,12}", any::<prop::sample::Index>()), 2),
            account in ".{0,16}",
        ) {
            let mut live: Vec<String> = members.into_iter().collect();
            // Draining members are live (and asked) but take no new jobs.
            let mut draining: Vec<String> = Vec::new();
            let (owner, replica) = owner_and_replica(&account, &live);
            let mut owner = owner.map(str::to_string).unwrap_or_default();
            let mut replica = replica.map(str::to_string);
            for (change, name, which) in changes {
                if change == 0 || live.len() <= 2 {
                    if !live.contains(&name) {
                        live.push(name);
                    }
                    continue;
                }
                if change == 1 {
                    let drains = live[which.index(live.len())].clone();
                    if !draining.contains(&drains) && draining.len() + 1 < live.len() {
                        draining.push(drains);
                    }
                    continue;
                }
                let gone = live.remove(which.index(live.len()));
                draining.retain(|m| *m != gone);
                if gone == owner {
                    // The replica adopts the job and picks a new replica.
                    prop_assume!(replica.is_some());
                    owner = replica.take().unwrap_or_default();
                } else if Some(&gone) != replica.as_ref() {
                    continue;
                }
                replica = rank(&account, &live)
                    .into_iter()
                    .find(|m| *m != owner)
                    .map(str::to_string);
            }
            let ready: Vec<&String> = live.iter().filter(|m| !draining.contains(m)).collect();
            let me = rank(&account, &ready)[0];
            let keepers: Vec<&str> = [Some(owner.as_str()), replica.as_deref()]
                .into_iter()
                .flatten()
                .collect();
            let mut asked = key_holders(&account, &live, me);
            asked.push(me);
            prop_assert!(
                keepers.iter().any(|k| asked.contains(k)),
                "{me} asks {asked:?}, the key is on {keepers:?}"
            );
        }

        #[test]
        fn owner_and_replica_are_the_top_of_rank(
            account in ".{0,16}",
            members in prop::collection::vec("[a-z0-9-]{1,12}", 0..12),
        ) {
            let ranked = rank(&account, &members);
            let (owner, replica) = owner_and_replica(&account, &members);
            prop_assert_eq!(owner, ranked.first().copied());
            prop_assert_eq!(replica, ranked.get(1).copied());
            if let (Some(o), Some(r)) = (owner, replica) {
                prop_assert_ne!(o, r);
            }
        }

        #[test]
        fn order_of_members_does_not_matter(
            account in ".{0,16}",
            members in prop::collection::vec("[a-z0-9-]{1,12}", 0..12),
            seed in any::<u64>(),
        ) {
            let mut shuffled = members.clone();
            // A deterministic shuffle from the seed.
            let len = shuffled.len();
            for i in (1..len).rev() {
                let j = (seed.wrapping_mul(i as u64 + 1).rotate_left(17) % (i as u64 + 1)) as usize;
                shuffled.swap(i, j);
            }
            prop_assert_eq!(rank(&account, &members), rank(&account, &shuffled));
        }

        #[test]
        fn removing_a_member_moves_only_its_accounts(
            members in prop::collection::btree_set("[a-z0-9-]{1,12}", 2..10),
            gone in any::<prop::sample::Index>(),
            accounts in prop::collection::vec(".{0,16}", 1..64),
        ) {
            let before: Vec<&String> = members.iter().collect();
            let gone = before[gone.index(before.len())].clone();
            let after: Vec<&String> = members.iter().filter(|m| **m != gone).collect();
            for account in &accounts {
                let (old_owner, old_replica) = owner_and_replica(account, &before);
                let (new_owner, _) = owner_and_replica(account, &after);
                if old_owner == Some(gone.as_str()) {
                    // The replica takes over, as the design says.
                    prop_assert_eq!(new_owner, old_replica);
                } else {
                    prop_assert_eq!(new_owner, old_owner);
                }
            }
        }
    }
}
