#!/usr/bin/env bash
# Check that patches/pretrain_gpt_espace.patch applies to a Megatron-LM checkout.
#
#   patches/check_patch.sh /path/to/Megatron-LM        # exit 0: it applies cleanly
#
# The patch is made against tag core_v0.16.1 (pair it with pip megatron-core==0.16.1); the
# checkout's tag is reported when it is a git checkout. Nothing is modified: apply it with
#   git -C /path/to/Megatron-LM apply "$(pwd)/patches/pretrain_gpt_espace.patch"
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PATCH="$HERE/pretrain_gpt_espace.patch"
TAG=core_v0.16.1

if [ $# -ne 1 ]; then
    echo "usage: $0 MEGATRON_LM_CHECKOUT" >&2
    exit 2
fi
CHECKOUT=$1
if [ ! -f "$CHECKOUT/pretrain_gpt.py" ]; then
    echo "$CHECKOUT: no pretrain_gpt.py (not a Megatron-LM checkout)" >&2
    exit 2
fi

if git -C "$CHECKOUT" rev-parse --git-dir >/dev/null 2>&1; then
    head=$(git -C "$CHECKOUT" rev-parse HEAD)
    tag=$(git -C "$CHECKOUT" rev-parse -q --verify "$TAG^{commit}" 2>/dev/null || true)
    if [ -z "$tag" ]; then
        echo "note: $CHECKOUT has no tag $TAG (fetch tags to compare); checking the patch anyway"
    elif [ "$head" != "$tag" ]; then
        echo "note: $CHECKOUT is at ${head:0:12}, not $TAG (${tag:0:12}); checking the patch anyway"
    fi
fi

cd "$CHECKOUT"
if err=$(git apply --check "$PATCH" 2>&1); then
    echo "ok: $(basename "$PATCH") applies cleanly to $CHECKOUT"
    exit 0
fi
if git apply --check --reverse "$PATCH" >/dev/null 2>&1; then
    echo "ok: $(basename "$PATCH") is already applied in $CHECKOUT"
    exit 0
fi
echo "$err" >&2
echo "FAILED: $(basename "$PATCH") does not apply to $CHECKOUT (made against $TAG)" >&2
exit 1
