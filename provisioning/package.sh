#!/usr/bin/env bash
# Builds the node release archive, kiln-node-<version>-x86_64-linux.tar.gz: what a bare GPU host
# (a Lambda Cloud VM) downloads to become a Kiln node, and prints its sha256.
#
#   provisioning/package.sh [--kilnd PATH] [--version V] [--out DIR]
#
# Layout (one top folder; bootstrap.sh finds the rest relative to itself):
#   kiln-node-<version>/kilnd
#   kiln-node-<version>/provisioning/{bootstrap.sh,fetch-models.sh,models.tsv,README.md}
#   kiln-node-<version>/systemd/{kilnd.service,kiln.sysusers,kiln.tmpfiles,kilnd.env}
# Unpacked anywhere, it runs as-is:
#   sudo kiln-node-<version>/provisioning/bootstrap.sh --kilnd kiln-node-<version>/kilnd …
#
# Options:
#   --kilnd PATH   the kilnd binary to pack (default: cargo build --release -p kiln-daemon and
#                  take target/release/kilnd, or $CARGO_TARGET_DIR/release/kilnd)
#   --version V    the version in the name (default: the workspace version in Cargo.toml)
#   --out DIR      where to write the archive (default: the current folder)
#
# The archive is reproducible: entries sorted, owned by root, dated SOURCE_DATE_EPOCH (default:
# the last commit's time, else 0), gzip without a name or time. Publish it over https and set
# [providers.lambda] bootstrap_url and bootstrap_sha256 in kiln.toml (README: Deploying).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

kilnd=""
version=""
out=$PWD

say() { printf 'package: %s\n' "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}

while [[ $# -gt 0 ]]; do
    case $1 in
    --kilnd) kilnd=${2:?--kilnd needs a path}; shift 2 ;;
    --version) version=${2:?--version needs a version}; shift 2 ;;
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown option $1 (see --help)" ;;
    esac
done

if [[ -z $version ]]; then
    # The first `version = "…"` of the root Cargo.toml is [workspace.package]'s.
    version=$(sed -n 's/^version = "\([^"]*\)"$/\1/p' "$repo/Cargo.toml" | head -n 1)
    [[ -n $version ]] || die "no version in $repo/Cargo.toml; pass --version"
fi
[[ $version =~ ^[A-Za-z0-9._+-]+$ ]] || die "--version '$version' is not a version"
[[ -d $out ]] || die "--out $out is not a folder"
out=$(cd "$out" && pwd)

if [[ -z $kilnd ]]; then
    say "building kilnd (cargo build --release -p kiln-daemon --bin kilnd)"
    (cd "$repo" && cargo build --release --locked -p kiln-daemon --bin kilnd) ||
        die "cargo build failed"
    kilnd="${CARGO_TARGET_DIR:-$repo/target}/release/kilnd"
fi
[[ -f $kilnd && -x $kilnd ]] || die "--kilnd $kilnd is not an executable file"
# An x86-64 ELF: the magic 7f 45 4c 46, then e_machine (offset 18) 0x3e.
magic=$(od -An -tx1 -N4 "$kilnd" | tr -d ' \n')
machine=$(od -An -tx1 -j18 -N2 "$kilnd" | tr -d ' \n')
[[ $magic == 7f454c46 && $machine == 3e00 ]] ||
    die "$kilnd is not an x86-64 Linux executable (the archive is named x86_64-linux)"

name="kiln-node-$version-x86_64-linux"
top="kiln-node-$version"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

mkdir -p "$stage/$top/provisioning" "$stage/$top/systemd"
install -m 0755 "$kilnd" "$stage/$top/kilnd"
for file in bootstrap.sh fetch-models.sh; do
    install -m 0755 "$here/$file" "$stage/$top/provisioning/$file"
done
for file in models.tsv README.md; do
    install -m 0644 "$here/$file" "$stage/$top/provisioning/$file"
done
for file in kilnd.service kiln.sysusers kiln.tmpfiles kilnd.env; do
    [[ -f $repo/systemd/$file ]] || die "$repo/systemd/$file is missing"
    install -m 0644 "$repo/systemd/$file" "$stage/$top/systemd/$file"
done

if [[ -z ${SOURCE_DATE_EPOCH:-} ]]; then
    SOURCE_DATE_EPOCH=$(git -C "$repo" log -1 --format=%ct 2>/dev/null) || SOURCE_DATE_EPOCH=0
fi
[[ $SOURCE_DATE_EPOCH =~ ^[0-9]+$ ]] || die "SOURCE_DATE_EPOCH '$SOURCE_DATE_EPOCH' is not a number"

archive="$out/$name.tar.gz"
tar -C "$stage" --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
    -cf - "$top" | gzip -n -9 >"$archive.partial"
mv -f "$archive.partial" "$archive"
sha=$(sha256sum "$archive" | cut -d ' ' -f 1)
say "wrote $archive"
printf '%s  %s\n' "$sha" "$(basename "$archive")"
say "publish it over https, then in kiln.toml [providers.lambda]:"
say "  bootstrap_url = \"https://…/$(basename "$archive")\""
say "  bootstrap_sha256 = \"$sha\""
