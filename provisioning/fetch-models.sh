#!/usr/bin/env bash
# Downloads the models of a manifest into ComfyUI's models folder, resumably and verified.
#
#   fetch-models.sh MANIFEST MODELS_DIR
#
# MANIFEST is tab-separated, one model a line (blank lines and lines starting with # are
# skipped):
#
#   URL <TAB> SIZE_BYTES <TAB> SHA256 <TAB> DEST
#
# DEST is relative to MODELS_DIR (e.g. checkpoints/sd_xl_base_1.0.safetensors). URL may be
# https://, http:// or file://. A model already in place is checked (size, then sha256, once per
# size and modification time: the result is remembered under MODELS_DIR/.kiln-verified) and
# kept. A missing one is downloaded to MODELS_DIR/.partial/SHA256.part with `curl -C -`, so an
# interrupted download resumes, then checked; only a file whose size and sha256 match is moved
# to DEST. A mismatch is refused: the partial file is deleted, DEST is left alone, the line is
# named, and the script exits 1 after trying every other model.
#
# Environment: CURL (default curl), SHA256SUM (default sha256sum), HF_TOKEN (sent as a bearer
# token to huggingface.co only), KILN_DRY_RUN=1 (say what would be downloaded, change nothing).
set -euo pipefail

CURL=${CURL:-curl}
SHA256SUM=${SHA256SUM:-sha256sum}
DRY_RUN=${KILN_DRY_RUN:-0}

say() { printf 'fetch-models: %s\n' "$*" >&2; }

if [[ $# -ne 2 ]]; then
    say "usage: fetch-models.sh MANIFEST MODELS_DIR"
    exit 2
fi
manifest=$1
models_dir=$2
if [[ ! -r $manifest ]]; then
    say "cannot read the manifest $manifest"
    exit 2
fi

sha256_of() {
    local out
    out=$("$SHA256SUM" "$1") || return 1
    printf '%s\n' "${out%% *}"
}

size_of() { stat -c %s "$1"; }
mtime_of() { stat -c %Y "$1"; }

# Whether DEST (already there) is the manifest's file: size first, then sha256 unless a stamp
# says this very file (size and mtime) was verified before.
in_place() {
    local path=$1 size=$2 sha=$3 stamp=$4
    [[ -f $path ]] || return 1
    local actual_size
    actual_size=$(size_of "$path")
    [[ $actual_size == "$size" ]] || return 1
    local seen
    seen="$sha $size $(mtime_of "$path")"
    if [[ -f $stamp && $(<"$stamp") == "$seen" ]]; then
        return 0
    fi
    [[ $(sha256_of "$path") == "$sha" ]] || return 1
    if [[ $DRY_RUN != 1 ]]; then
        mkdir -p "$(dirname "$stamp")"
        printf '%s\n' "$seen" >"$stamp"
    fi
}

failures=0
line_no=0
while IFS= read -r line || [[ -n $line ]]; do
    line_no=$((line_no + 1))
    line=${line%$'\r'}
    [[ -z ${line//[[:space:]]/} || $line == \#* ]] && continue
    IFS=$'\t' read -r url size sha dest extra <<<"$line"
    where="$manifest:$line_no"
    if [[ -z ${url:-} || -z ${size:-} || -z ${sha:-} || -z ${dest:-} || -n ${extra:-} ]]; then
        say "$where: expected 4 tab-separated fields (URL, SIZE, SHA256, DEST)"
        failures=$((failures + 1))
        continue
    fi
    sha=${sha,,}
    if [[ ! $sha =~ ^[0-9a-f]{64}$ ]]; then
        say "$where: $dest: the sha256 '$sha' is not 64 hex digits"
        failures=$((failures + 1))
        continue
    fi
    if [[ ! $size =~ ^[0-9]+$ ]]; then
        say "$where: $dest: the size '$size' is not a number of bytes"
        failures=$((failures + 1))
        continue
    fi
    if [[ $dest == /* || /$dest/ == */../* ]]; then
        say "$where: $dest: DEST must be relative to the models folder, without '..'"
        failures=$((failures + 1))
        continue
    fi
    target="$models_dir/$dest"
    stamp="$models_dir/.kiln-verified/${dest//\//__}"
    if in_place "$target" "$size" "$sha" "$stamp"; then
        say "$dest: present and verified"
        continue
    fi
    if [[ -e $target ]]; then
        say "$dest: present but not the manifest's file (size or sha256 differ); downloading it again"
    fi
    if [[ $DRY_RUN == 1 ]]; then
        say "[dry-run] would download $url to $target ($size bytes, sha256 $sha)"
        continue
    fi
    partial="$models_dir/.partial/$sha.part"
    mkdir -p "$(dirname "$partial")"
    # A partial file longer than the model cannot be resumed: start over.
    if [[ -f $partial && $(size_of "$partial") -gt $size ]]; then
        rm -f "$partial"
    fi
    auth=()
    if [[ -n ${HF_TOKEN:-} && $url == https://huggingface.co/* ]]; then
        auth=(-H "Authorization: Bearer $HF_TOKEN")
    fi
    say "$dest: downloading $url"
    if [[ -f $partial && $(size_of "$partial") -eq $size ]]; then
        : # fully downloaded before; only the check is left
    elif ! "$CURL" --fail --location --silent --show-error --retry 5 --retry-delay 2 \
        "${auth[@]}" -C - -o "$partial" "$url"; then
        say "$where: $dest: the download of $url failed (the partial file is kept for a resume)"
        failures=$((failures + 1))
        continue
    fi
    got_size=$(size_of "$partial")
    if [[ $got_size != "$size" ]]; then
        rm -f "$partial"
        say "$where: $dest: refused: $url gave $got_size bytes, the manifest says $size; not installed"
        failures=$((failures + 1))
        continue
    fi
    got_sha=$(sha256_of "$partial")
    if [[ $got_sha != "$sha" ]]; then
        rm -f "$partial"
        say "$where: $dest: refused: sha256 mismatch (expected $sha, got $got_sha) from $url; not installed"
        failures=$((failures + 1))
        continue
    fi
    mkdir -p "$(dirname "$target")"
    mv -f "$partial" "$target"
    mkdir -p "$(dirname "$stamp")"
    printf '%s\n' "$sha $size $(mtime_of "$target")" >"$stamp"
    say "$dest: installed"
done <"$manifest"

if [[ $failures -gt 0 ]]; then
    say "$failures model(s) not installed; see above"
    exit 1
fi
