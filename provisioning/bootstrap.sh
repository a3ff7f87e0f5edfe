#!/usr/bin/env bash
# Turns a bare Ubuntu 22.04/24.04 GPU host into a Kiln node, idempotently: run it again and it
# changes nothing that is already right.
#
#   sudo provisioning/bootstrap.sh --kilnd target/release/kilnd [options]
#
# Steps: check the NVIDIA driver (nvidia-smi lists a GPU); create the `kiln` system user (in
# the video and render groups); install ComfyUI at a pinned git tag into /opt/comfyui with its
# own venv; download and verify the models of a manifest (fetch-models.sh); install kilnd, its
# config (given, or a generated one that starts this ComfyUI), keys, operator token and cluster
# certificates (a folder from `kiln certs issue`, or a KILN_BUNDLE from `kiln certs bundle`);
# install the systemd unit, sysusers and tmpfiles snippets and enable kilnd.
#
# Options:
#   --kilnd PATH            the kilnd binary to install as /usr/local/bin/kilnd
#   --config FILE           kilnd.toml to install (default: keep the one there, or generate one)
#   --keys-file FILE        keys.toml to install (default: keep the one there, or an empty one)
#   --certs DIR             cluster certificates from `kiln certs issue` (cert.pem, key.pem, …)
#   --bundle VALUE          a KILN_BUNDLE value from `kiln certs bundle` (or set KILN_BUNDLE)
#   --advertise URL         with certificates and a generated config: the gossip address other
#                           members dial (quic://PUBLIC_IP:7946 or tcp://PUBLIC_IP:7946)
#   --seeds LIST            with certificates and a generated config: members to join through,
#                           comma-separated (quic://IP:7946,…; default: $KILN_SEEDS)
#   --models FILE           model manifest (default: models.tsv beside this script)
#   --no-models             skip the models
#   --comfyui-version TAG   ComfyUI git tag (default: $COMFYUI_VERSION or v0.3.64)
#   --no-start              enable the unit but do not start or restart it
#   --root DIR              operate under DIR instead of / (a test or image root): ownership is
#                           left alone and systemctl gets --root
#   --dry-run               print what would change, change nothing
#
# Commands can be replaced through the environment (tests stub them): NVIDIA_SMI, CURL, GIT,
# PYTHON, SYSTEMCTL, USERADD, SYSTEMD_SYSUSERS, SYSTEMD_TMPFILES, CHOWN. Also COMFYUI_REPO,
# TORCH_INDEX_URL, HF_TOKEN (models from huggingface.co). KILN_OPERATOR_TOKEN, when set, becomes
# /etc/kiln/operator-token (else one is generated once).
set -euo pipefail

NVIDIA_SMI=${NVIDIA_SMI:-nvidia-smi}
GIT=${GIT:-git}
PYTHON=${PYTHON:-python3}
SYSTEMCTL=${SYSTEMCTL:-systemctl}
USERADD=${USERADD:-useradd}
SYSTEMD_SYSUSERS=${SYSTEMD_SYSUSERS:-systemd-sysusers}
SYSTEMD_TMPFILES=${SYSTEMD_TMPFILES:-systemd-tmpfiles}
CHOWN=${CHOWN:-chown}
export CURL=${CURL:-curl}
COMFYUI_REPO=${COMFYUI_REPO:-https://github.com/comfyanonymous/ComfyUI.git}
COMFYUI_VERSION=${COMFYUI_VERSION:-v0.3.64}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

root=""
dry_run=0
kilnd_bin=""
config=""
keys_file=""
certs=""
bundle=${KILN_BUNDLE:-}
advertise=""
seeds=${KILN_SEEDS:-}
models="$here/models.tsv"
fetch_models=1
start=1

say() { printf 'bootstrap: %s\n' "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}

while [[ $# -gt 0 ]]; do
    case $1 in
    --kilnd) kilnd_bin=${2:?--kilnd needs a path}; shift 2 ;;
    --config) config=${2:?--config needs a file}; shift 2 ;;
    --keys-file) keys_file=${2:?--keys-file needs a file}; shift 2 ;;
    --certs) certs=${2:?--certs needs a folder}; shift 2 ;;
    --bundle) bundle=${2:?--bundle needs a value}; shift 2 ;;
    --advertise) advertise=${2:?--advertise needs a URL}; shift 2 ;;
    --seeds) seeds=${2?--seeds needs a list}; shift 2 ;;
    --models) models=${2:?--models needs a file}; shift 2 ;;
    --no-models) fetch_models=0; shift ;;
    --comfyui-version) COMFYUI_VERSION=${2:?--comfyui-version needs a tag}; shift 2 ;;
    --no-start) start=0; shift ;;
    --root) root=${2:?--root needs a folder}; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown option $1 (see --help)" ;;
    esac
done

if [[ -n $root ]]; then
    [[ -d $root ]] || die "--root $root is not a folder"
    root=$(cd "$root" && pwd)
fi
[[ $COMFYUI_VERSION =~ ^[A-Za-z0-9._-]+$ ]] || die "--comfyui-version '$COMFYUI_VERSION' is not a tag"
if [[ -n $advertise && ! $advertise =~ ^(quic|tcp)://[^\"[:space:]]+$ ]]; then
    die "--advertise '$advertise' is not quic://HOST:PORT or tcp://HOST:PORT"
fi

seed_list=""
if [[ -n $seeds ]]; then
    IFS=, read -ra seed_items <<<"$seeds"
    for seed in "${seed_items[@]}"; do
        [[ $seed =~ ^(quic|tcp)://[^\"[:space:]\\,]+$ ]] ||
            die "--seeds: '$seed' is not quic://HOST:PORT or tcp://HOST:PORT"
        seed_list+="${seed_list:+, }\"$seed\""
    done
fi

comfy_dir=/opt/comfyui
etc=/etc/kiln
state=/var/lib/kiln

# Runs a command that changes the host, or says it would.
act() {
    if [[ $dry_run == 1 ]]; then
        say "[dry-run] would run: $*"
    else
        "$@"
    fi
}

# Installs SRC as DEST (a path on the host, under --root) with MODE when its content or mode
# differ. Prints nothing and changes nothing when DEST is already right; returns 0 when it
# changed something, 1 when not.
install_file() {
    local src=$1 dest=$2 mode=$3
    local path="$root$dest"
    if [[ -f $path ]] && cmp -s "$src" "$path" && [[ $(stat -c %a "$path") == "${mode#0}" ]]; then
        return 1
    fi
    if [[ $dry_run == 1 ]]; then
        say "[dry-run] would install $dest (mode $mode)"
        return 0
    fi
    mkdir -p "$(dirname "$path")"
    install -m "$mode" "$src" "$path.kiln-new"
    mv -f "$path.kiln-new" "$path"
    say "installed $dest"
    return 0
}

# Makes a folder (under --root) with MODE, owned by the kiln user on a real host.
make_dir() {
    local dir=$1 mode=$2 owner=${3:-}
    local path="$root$dir"
    if [[ -d $path && $(stat -c %a "$path") == "${mode#0}" ]]; then
        return 0
    fi
    if [[ $dry_run == 1 ]]; then
        say "[dry-run] would create $dir (mode $mode)"
        return 0
    fi
    mkdir -p "$path"
    chmod "$mode" "$path"
    if [[ -n $owner && -z $root ]]; then
        "$CHOWN" "$owner" "$path"
    fi
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

changed_units=0
changed_node=0

# --- 1. The NVIDIA driver -----------------------------------------------------------------
check_gpu() {
    local gpus
    if ! gpus=$("$NVIDIA_SMI" --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1); then
        die "the NVIDIA driver does not answer (nvidia-smi: ${gpus:-no output}). Install it (sudo ubuntu-drivers install), reboot, and run this again."
    fi
    [[ -n ${gpus//[[:space:]]/} ]] || die "nvidia-smi lists no GPU"
    while IFS= read -r gpu; do
        say "GPU: $gpu"
    done <<<"$gpus"
}

check_os() {
    local os_release="$root/etc/os-release" id="" version=""
    if [[ -r $os_release ]]; then
        id=$(sed -n 's/^ID=//p' "$os_release" | tr -d '"')
        version=$(sed -n 's/^VERSION_ID=//p' "$os_release" | tr -d '"')
    fi
    case "$id $version" in
    "ubuntu 22.04" | "ubuntu 24.04") ;;
    *) say "warning: made for Ubuntu 22.04/24.04, this is '${id:-unknown} ${version:-}'; going on" ;;
    esac
}

# --- 2. The kiln user ---------------------------------------------------------------------
ensure_user() {
    if grep -q '^kiln:' "$root/etc/passwd" 2>/dev/null; then
        return 0
    fi
    local groups=()
    local group
    for group in video render; do
        if grep -q "^$group:" "$root/etc/group" 2>/dev/null; then
            groups+=("$group")
        fi
    done
    local args=(--system --user-group --home-dir "$state" --no-create-home --shell /usr/sbin/nologin)
    if [[ ${#groups[@]} -gt 0 ]]; then
        args+=(--groups "$(IFS=,; echo "${groups[*]}")")
    fi
    if [[ -n $root ]]; then
        args+=(--root "$root")
    fi
    act "$USERADD" "${args[@]}" kiln
    say "created the kiln user"
}

# --- 3. ComfyUI at a pinned tag, in its own venv ------------------------------------------
ensure_comfyui() {
    local dir="$root$comfy_dir"
    local marker="$dir/.kiln-installed"
    local want="$COMFYUI_VERSION $TORCH_INDEX_URL"
    if [[ -f $marker && $(<"$marker") == "$want" ]]; then
        return 0
    fi
    if [[ -d $dir/.git ]]; then
        act "$GIT" -C "$dir" fetch --depth 1 origin "refs/tags/$COMFYUI_VERSION:refs/tags/$COMFYUI_VERSION"
        act "$GIT" -C "$dir" checkout --force "refs/tags/$COMFYUI_VERSION"
    else
        act "$GIT" clone --depth 1 --branch "$COMFYUI_VERSION" "$COMFYUI_REPO" "$dir"
    fi
    if [[ ! -x $dir/venv/bin/python ]]; then
        act "$PYTHON" -m venv "$dir/venv"
    fi
    act "$dir/venv/bin/python" -m pip install --quiet --upgrade pip
    act "$dir/venv/bin/python" -m pip install --quiet torch torchvision torchaudio --extra-index-url "$TORCH_INDEX_URL"
    act "$dir/venv/bin/python" -m pip install --quiet -r "$dir/requirements.txt"
    if [[ $dry_run == 0 ]]; then
        printf '%s\n' "$want" >"$marker"
    fi
    say "ComfyUI $COMFYUI_VERSION installed in $comfy_dir"
    changed_node=1
}

# --- 4. Models ----------------------------------------------------------------------------
ensure_models() {
    [[ $fetch_models == 1 ]] || return 0
    [[ -r $models ]] || die "cannot read the model manifest $models (or pass --no-models)"
    KILN_DRY_RUN=$dry_run "$here/fetch-models.sh" "$models" "$root$comfy_dir/models" ||
        die "models missing or refused (see above); fix the manifest or the source and run this again"
}

# --- 5. kilnd, its config, keys, token and certificates -----------------------------------
ensure_kilnd() {
    if [[ -n $kilnd_bin ]]; then
        [[ -x $kilnd_bin ]] || die "--kilnd $kilnd_bin is not an executable file"
        if install_file "$kilnd_bin" /usr/local/bin/kilnd 0755; then changed_node=1; fi
    elif [[ ! -x $root/usr/local/bin/kilnd ]]; then
        die "kilnd is not installed: build it (cargo build --release -p kiln-daemon) and pass --kilnd target/release/kilnd"
    fi
}

write_default_config() {
    cat >"$1" <<EOF
# kilnd on this host, written by provisioning/bootstrap.sh (every key: kilnd.example.toml).
[node]
data_dir = "$state"

[api]
listen = "0.0.0.0:7860"
keys_file = "$etc/keys.toml"
operator_token_file = "$etc/operator-token"

[comfy]
# ComfyUI from $comfy_dir (read-only to the unit); what it writes goes under $state/comfyui.
command = ["$comfy_dir/venv/bin/python", "main.py", "--listen", "127.0.0.1", "--port", "8188",
           "--disable-auto-launch", "--output-directory", "$state/comfyui/output",
           "--input-directory", "$state/comfyui/input", "--temp-directory", "$state/comfyui/temp",
           "--user-directory", "$state/comfyui/user"]
url = "http://127.0.0.1:8188"
cwd = "$comfy_dir"
start_timeout_s = 300
EOF
    if [[ -d $root$etc/certs || -n $certs || -n $bundle ]]; then
        [[ -n $advertise ]] ||
            die "a cluster member needs --advertise quic://PUBLIC_IP:7946 (the address other members dial), or give --config"
        local transport=quic
        [[ $advertise == tcp://* ]] && transport=tcp
        cat >>"$1" <<EOF

[cluster]
certs_dir = "$etc/certs"
listen = "0.0.0.0:7946"
transports = ["$transport"]
advertise = "$advertise"
EOF
        if [[ -n $seed_list ]]; then
            printf 'seeds = [%s]\n' "$seed_list" >>"$1"
        else
            printf '# seeds = ["quic://ANY-MEMBER:7946"]\n' >>"$1"
        fi
    fi
}

# Unpacks a KILN_BUNDLE into a folder, accepting only the names `kiln certs bundle` writes.
unpack_bundle() {
    local value=$1 out=$2
    mkdir -p "$out"
    printf '%s' "$value" | base64 -d >"$tmp/bundle.tgz" 2>/dev/null ||
        die "the bundle is not base64 (make it with: kiln certs bundle --ca CA --member NAME)"
    local names
    names=$(tar -tzf "$tmp/bundle.tgz" 2>/dev/null) || die "the bundle is not a gzip'd tar from kiln certs bundle"
    local name
    while IFS= read -r name; do
        case $name in
        certs/cert.pem | certs/key.pem | certs/ca.pem | certs/crl.pem | kilnd.toml | keys.toml) ;;
        *) die "the bundle holds an unexpected file '$name'; refused" ;;
        esac
    done <<<"$names"
    tar -xzf "$tmp/bundle.tgz" -C "$out" --no-same-owner --no-same-permissions
}

ensure_node_files() {
    make_dir "$etc" 0700 kiln:kiln
    local from_bundle="$tmp/bundle"
    if [[ -n $bundle ]]; then
        unpack_bundle "$bundle" "$from_bundle"
        [[ -z $config && -f $from_bundle/kilnd.toml ]] && config="$from_bundle/kilnd.toml"
        [[ -z $keys_file && -f $from_bundle/keys.toml ]] && keys_file="$from_bundle/keys.toml"
        [[ -z $certs ]] && certs="$from_bundle/certs"
    fi
    if [[ -n $config ]]; then
        [[ -r $config ]] || die "cannot read --config $config"
        if install_file "$config" "$etc/kilnd.toml" 0600; then changed_node=1; fi
    elif [[ ! -f $root$etc/kilnd.toml ]]; then
        write_default_config "$tmp/kilnd.toml"
        if install_file "$tmp/kilnd.toml" "$etc/kilnd.toml" 0600; then changed_node=1; fi
    fi
    if [[ -n $keys_file ]]; then
        [[ -r $keys_file ]] || die "cannot read --keys-file $keys_file"
        install_file "$keys_file" "$etc/keys.toml" 0600 || true
    elif [[ ! -f $root$etc/keys.toml ]]; then
        printf '# API keys (hashes): kiln keys add --account A --tier T --keys-file %s\n' "$etc/keys.toml" >"$tmp/keys.toml"
        install_file "$tmp/keys.toml" "$etc/keys.toml" 0600 || true
    fi
    if [[ -n ${KILN_OPERATOR_TOKEN:-} ]]; then
        printf '%s' "$KILN_OPERATOR_TOKEN" >"$tmp/operator-token"
        if install_file "$tmp/operator-token" "$etc/operator-token" 0600; then changed_node=1; fi
    elif [[ ! -f $root$etc/operator-token ]]; then
        # 256 random bits, hex.
        head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$tmp/operator-token"
        install_file "$tmp/operator-token" "$etc/operator-token" 0600 || true
        say "operator token written to $etc/operator-token"
    fi
    if [[ -n $certs ]]; then
        local file
        for file in cert.pem ca.pem key.pem; do
            [[ -r $certs/$file ]] || die "--certs $certs has no $file (make the folder with: kiln certs issue)"
        done
        make_dir "$etc/certs" 0700 kiln:kiln
        for file in cert.pem ca.pem crl.pem key.pem; do
            if [[ -f $certs/$file ]] && install_file "$certs/$file" "$etc/certs/$file" 0600; then
                changed_node=1
            fi
        done
    fi
    make_dir "$state" 0700 kiln:kiln
    local sub
    for sub in comfyui comfyui/output comfyui/input comfyui/temp comfyui/user cache; do
        make_dir "$state/$sub" 0700 kiln:kiln
    done
    if [[ -z $root && $dry_run == 0 ]]; then
        "$CHOWN" -R kiln:kiln "$etc"
    fi
}

# --- 6. systemd ---------------------------------------------------------------------------
ensure_units() {
    if install_file "$repo/systemd/kilnd.service" /etc/systemd/system/kilnd.service 0644; then changed_units=1; fi
    if install_file "$repo/systemd/kiln.sysusers" /usr/lib/sysusers.d/kiln.conf 0644; then changed_units=1; fi
    if install_file "$repo/systemd/kiln.tmpfiles" /usr/lib/tmpfiles.d/kiln.conf 0644; then changed_units=1; fi
    if [[ ! -f $root$etc/kilnd.env ]]; then
        install_file "$repo/systemd/kilnd.env" "$etc/kilnd.env" 0600 || true
    fi
    local root_arg=()
    if [[ -n $root ]]; then
        root_arg=(--root="$root")
    fi
    if [[ $changed_units == 1 ]]; then
        act "$SYSTEMD_SYSUSERS" "${root_arg[@]}"
        act "$SYSTEMD_TMPFILES" "${root_arg[@]}" --create
        if [[ -z $root ]]; then
            act "$SYSTEMCTL" daemon-reload
        fi
    fi
    if ! "$SYSTEMCTL" "${root_arg[@]}" is-enabled --quiet kilnd.service 2>/dev/null; then
        act "$SYSTEMCTL" "${root_arg[@]}" enable kilnd.service
        changed_node=1
    fi
    if [[ -n $root || $start == 0 ]]; then
        return 0
    fi
    if ! "$SYSTEMCTL" is-active --quiet kilnd.service; then
        act "$SYSTEMCTL" start kilnd.service
    elif [[ $changed_node == 1 || $changed_units == 1 ]]; then
        act "$SYSTEMCTL" restart kilnd.service
    fi
}

check_os
check_gpu
ensure_user
ensure_comfyui
ensure_models
ensure_kilnd
ensure_node_files
# On a real host, kilnd checks its config (and the files it names) before the unit starts it.
if [[ -z $root && $dry_run == 0 ]]; then
    /usr/local/bin/kilnd check-config "$etc/kilnd.toml" >&2 ||
        die "kilnd refuses $etc/kilnd.toml (see above)"
fi
ensure_units
say "done: curl -s 127.0.0.1:7860/readyz answers 'ready' once ComfyUI is up (journalctl -u kilnd)"
