#!/usr/bin/env bash
# Bring the vLLM 0.26.0 bundle onto the GPU machine, one part per device command (a command carries
# at most 64 MiB; the parts are 60 MiB). The parts are made here by
#   bash ../shared/tools/vllm-peer/build.sh /work/main/.vllm-parts     (git-ignored)
# and /tmp on the GPU machine survives between commands only while the machine stays warm, so
# send the commands back to back:
#   bash scripts/gpu_vllm_parts.sh copy 0      (carry .vllm-parts/part_00; then 1, 2, 3 likewise)
#   bash scripts/gpu_vllm_parts.sh unpack      (carry .vllm-parts/SHA256SUMS: checks and unpacks to /tmp/vsite)
#   bash scripts/gpu_vllm_parts.sh check       (is /tmp/vsite complete? exit 0 if so)
# Paths may be moved with VLLM_PARTS (default .vllm-parts), VLLM_STAGE (/tmp/vparts), VLLM_SITE (/tmp/vsite).
set -euo pipefail
parts=${VLLM_PARTS:-.vllm-parts}
stage=${VLLM_STAGE:-/tmp/vparts}
site=${VLLM_SITE:-/tmp/vsite}
# The sum of the whole tar.xz as build.sh wrote it; used when SHA256SUMS is not carried.
sums_copy="$stage/SHA256SUMS"

case "${1:-}" in
copy)
    n=${2:?usage: gpu_vllm_parts.sh copy N}
    src="$parts/part_$(printf %02d "$n")"
    [ -f "$src" ] || { echo "no $src here: carry it with this command (carry: [\"$src\"])" >&2; exit 1; }
    mkdir -p "$stage"
    cp "$src" "$stage/"
    [ -f "$parts/SHA256SUMS" ] && cp "$parts/SHA256SUMS" "$sums_copy"
    echo "copied $src ($(stat -c %s "$src") bytes) to $stage; staged now: $(cd "$stage" && ls part_* | tr '\n' ' ')"
    ;;
unpack)
    [ -f "$parts/SHA256SUMS" ] && { mkdir -p "$stage"; cp "$parts/SHA256SUMS" "$sums_copy"; }
    # SHA256SUMS is a few bytes and tracked nowhere: if it was not carried, it is in the repo's copy.
    [ -f "$sums_copy" ] || { echo "no SHA256SUMS: carry .vllm-parts/SHA256SUMS with this command" >&2; exit 1; }
    ls "$stage"/part_* >/dev/null 2>&1 || { echo "no parts in $stage (the machine went cold?): copy them again" >&2; exit 1; }
    echo "parts staged: $(cd "$stage" && ls part_* | tr '\n' ' ')"
    cat "$stage"/part_* > "$stage/vllm.tar.xz"
    expected=$(awk '{print $1}' "$sums_copy")
    actual=$(sha256sum "$stage/vllm.tar.xz" | awk '{print $1}')
    if [ "$expected" != "$actual" ]; then
        echo "sha256 mismatch: expected $expected, got $actual (a part is missing or damaged: copy the parts again)" >&2
        rm -f "$stage/vllm.tar.xz"
        exit 1
    fi
    rm -rf "$site" && mkdir -p "$site"
    tar xJf "$stage/vllm.tar.xz" -C "$site"
    rm -f "$stage/vllm.tar.xz"
    touch "$site/.complete"
    echo "unpacked to $site ($(du -sh "$site" | cut -f1)); vllm $(cat "$site"/vllm-*.dist-info/METADATA 2>/dev/null | sed -n 's/^Version: //p')"
    ;;
check)
    [ -f "$site/.complete" ] && [ -d "$site/vllm" ] && { echo "vLLM bundle ready in $site"; exit 0; }
    echo "no complete vLLM bundle in $site" >&2
    exit 1
    ;;
*)
    echo "usage: bash scripts/gpu_vllm_parts.sh copy N | unpack | check" >&2
    exit 2
    ;;
esac
