#!/usr/bin/env bash
# Entry point of the Kiln container image (provisioning/Dockerfile) on hosts without systemd:
# the image's ENTRYPOINT, RunPod's start command, or what a Vast.ai onstart script execs.
#
# 1. KILN_BUNDLE (from `kiln certs bundle`: base64 of a tar.gz) is unpacked into $KILN_ETC:
#    certs/cert.pem, certs/key.pem, certs/ca.pem, certs/crl.pem and, when it has them,
#    kilnd.toml and keys.toml. Nothing else is accepted. KILN_OPERATOR_TOKEN, when set, becomes
#    $KILN_ETC/operator-token.
# 2. Without a kilnd.toml (bundled or baked into the image) one is written for this container:
#    ComfyUI from $KILN_COMFY_DIR, data under $KILN_DATA, and, with certificates, a [cluster]
#    section that advertises the provider's public address (Vast.ai: QUIC on the port mapped to
#    7946/udp; RunPod: TLS over TCP on the port mapped to 7946/tcp) and KILN_SEEDS
#    (comma-separated, e.g. quic://203.0.113.7:7946); elsewhere KILN_ADVERTISE gives the address.
# 3. The models of $KILN_MODELS (a fetch-models.sh manifest) are downloaded and verified into
#    $KILN_COMFY_DIR/models; KILN_MODELS=none skips them. A refused model stops the start.
# 4. `exec kilnd --config …`: kilnd replaces this shell, so as PID 1 it gets SIGTERM from
#    `docker stop` and drains, and it stops its own ComfyUI.
#
# Environment (defaults): KILND (/usr/local/bin/kilnd), KILN_ETC (/etc/kiln), KILN_DATA
# (/var/lib/kiln), KILN_COMFY_DIR (/opt/comfyui), KILN_MODELS (models.tsv beside this script),
# KILN_PYTHON ($KILN_COMFY_DIR/venv/bin/python), KILN_SEEDS, KILN_ADVERTISE, KILN_OPERATOR_TOKEN,
# HF_TOKEN.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KILND=${KILND:-/usr/local/bin/kilnd}
KILN_ETC=${KILN_ETC:-/etc/kiln}
KILN_DATA=${KILN_DATA:-/var/lib/kiln}
KILN_COMFY_DIR=${KILN_COMFY_DIR:-/opt/comfyui}
KILN_MODELS=${KILN_MODELS:-$here/models.tsv}
KILN_PYTHON=${KILN_PYTHON:-$KILN_COMFY_DIR/venv/bin/python}

say() { printf 'kiln-entry: %s\n' "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}

umask 077
mkdir -p "$KILN_ETC" "$KILN_DATA"

# --- 1. Certificates, config and keys from the bundle ---------------------------------------
if [[ -n ${KILN_BUNDLE:-} ]]; then
    work=$(mktemp -d)
    printf '%s' "$KILN_BUNDLE" | base64 -d >"$work/bundle.tgz" 2>/dev/null ||
        die "KILN_BUNDLE is not base64 (make it with: kiln certs bundle --ca CA --member NAME)"
    names=$(tar -tzf "$work/bundle.tgz" 2>/dev/null) ||
        die "KILN_BUNDLE is not a gzip'd tar from kiln certs bundle"
    while IFS= read -r name; do
        case $name in
        certs/cert.pem | certs/key.pem | certs/ca.pem | certs/crl.pem | kilnd.toml | keys.toml) ;;
        *) die "KILN_BUNDLE holds an unexpected file '$name'; refused" ;;
        esac
    done <<<"$names"
    tar -xzf "$work/bundle.tgz" -C "$work" --no-same-owner
    for name in $names; do
        mkdir -p "$(dirname "$KILN_ETC/$name")"
        install -m 0600 "$work/$name" "$KILN_ETC/$name"
    done
    rm -rf "$work"
    say "unpacked KILN_BUNDLE into $KILN_ETC: $(tr '\n' ' ' <<<"$names")"
fi
if [[ -n ${KILN_OPERATOR_TOKEN:-} ]]; then
    printf '%s' "$KILN_OPERATOR_TOKEN" >"$KILN_ETC/operator-token"
    chmod 600 "$KILN_ETC/operator-token"
fi
if [[ ! -f $KILN_ETC/keys.toml ]]; then
    printf '# API keys (hashes): kiln keys add --account A --tier T --keys-file keys.toml\n' >"$KILN_ETC/keys.toml"
fi

# --- 2. A config for this container when none was given -------------------------------------
toml_list() {
    # "a,b" → "a", "b" (values are checked to hold no quotes).
    local IFS=, item out=""
    for item in $1; do
        [[ $item == *'"'* || $item == *\\* ]] && die "KILN_SEEDS: '$item' holds a quote or backslash"
        out+="${out:+, }\"$item\""
    done
    printf '%s' "$out"
}

write_config() {
    local token_line=""
    if [[ -f $KILN_ETC/operator-token ]]; then
        token_line="operator_token_file = \"$KILN_ETC/operator-token\""
    fi
    cat <<EOF
# kilnd in a container, written by container-entry.sh (every key: kilnd.example.toml).
[node]
data_dir = "$KILN_DATA"

[api]
listen = "0.0.0.0:7860"
keys_file = "$KILN_ETC/keys.toml"
$token_line

[comfy]
command = ["$KILN_PYTHON", "main.py", "--listen", "127.0.0.1", "--port", "8188",
           "--disable-auto-launch", "--output-directory", "$KILN_DATA/comfyui/output",
           "--input-directory", "$KILN_DATA/comfyui/input", "--temp-directory", "$KILN_DATA/comfyui/temp",
           "--user-directory", "$KILN_DATA/comfyui/user"]
url = "http://127.0.0.1:8188"
cwd = "$KILN_COMFY_DIR"
start_timeout_s = 300
EOF
    [[ -f $KILN_ETC/certs/cert.pem ]] || return 0
    local transports advertise provider instance=""
    if [[ -n ${VAST_CONTAINERLABEL:-} || -n ${VAST_UDP_PORT_7946:-} ]]; then
        provider=vast
        transports='["quic"]'
        # shellcheck disable=SC2016 # kilnd expands ${VAR} itself at start.
        advertise='quic://${PUBLIC_IPADDR}:${VAST_UDP_PORT_7946}'
        instance=${VAST_CONTAINERLABEL:-}
        instance=${instance#C.}
    elif [[ -n ${RUNPOD_POD_ID:-} ]]; then
        provider=runpod
        transports='["tcp"]'
        # shellcheck disable=SC2016 # kilnd expands ${VAR} itself at start.
        advertise='tcp://${RUNPOD_PUBLIC_IP}:${RUNPOD_TCP_PORT_7946}'
        instance=$RUNPOD_POD_ID
    else
        provider=""
        transports='["quic"]'
        advertise=""
    fi
    # KILN_ADVERTISE (e.g. quic://203.0.113.7:7946) wins over the provider's address.
    if [[ -n ${KILN_ADVERTISE:-} ]]; then
        [[ $KILN_ADVERTISE =~ ^(quic|tcp)://[^\"[:space:]]+$ ]] ||
            die "KILN_ADVERTISE '$KILN_ADVERTISE' is not quic://HOST:PORT or tcp://HOST:PORT"
        advertise=$KILN_ADVERTISE
        [[ $advertise == tcp://* ]] && transports='["tcp"]'
    fi
    [[ -n $advertise ]] ||
        die "no address for other members to dial: set KILN_ADVERTISE=quic://PUBLIC_IP:PORT (Vast.ai and RunPod are detected)"
    cat <<EOF

[cluster]
certs_dir = "$KILN_ETC/certs"
listen = "0.0.0.0:7946"
transports = $transports
seeds = [$(toml_list "${KILN_SEEDS:-}")]
EOF
    [[ -n $advertise ]] && printf 'advertise = "%s"\n' "$advertise"
    [[ -n $provider ]] && printf 'provider = "%s"\n' "$provider"
    [[ -n $instance && $instance =~ ^[A-Za-z0-9._-]+$ ]] && printf 'instance_id = "%s"\n' "$instance"
    return 0
}

config=$KILN_ETC/kilnd.toml
if [[ ! -f $config ]]; then
    write_config >"$config.partial"
    mv -f "$config.partial" "$config"
    say "wrote $config for this container"
fi
mkdir -p "$KILN_DATA/comfyui/output" "$KILN_DATA/comfyui/input" "$KILN_DATA/comfyui/temp" "$KILN_DATA/comfyui/user"

# --- 3. Models ------------------------------------------------------------------------------
if [[ $KILN_MODELS != none ]]; then
    [[ -r $KILN_MODELS ]] || die "cannot read the model manifest $KILN_MODELS (KILN_MODELS=none skips models)"
    "$here/fetch-models.sh" "$KILN_MODELS" "$KILN_COMFY_DIR/models" ||
        die "models missing or refused (see above); not starting kilnd"
fi

# --- 4. kilnd in the foreground -------------------------------------------------------------
"$KILND" check-config "$config" >&2 || die "kilnd refuses $config (see above)"
say "starting kilnd"
exec "$KILND" --config "$config"
