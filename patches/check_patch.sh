#!/usr/bin/env bash
# Check that the ESPACE patch for a Megatron-LM checkout's version applies to it.
#
#   patches/check_patch.sh /path/to/Megatron-LM        # exit 0: it applies cleanly
#
# Two patches, chosen by the checkout's megatron/core/package_info.py:
#   pretrain_gpt_espace.patch                 tag core_v0.16.1 (pretrain() parses the flags)
#   pretrain_gpt_espace-core_v0.19.2.patch    tag core_v0.19.2 (config container, keyword
#                                             model_provider)
# Pair each with the same pip megatron-core. The checkout's tag is reported when it is a git
# checkout. Nothing is modified: apply it with
#   git -C /path/to/Megatron-LM apply "$(pwd)/patches/<the patch named above>"
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [ $# -ne 1 ]; then
    echo "usage: $0 MEGATRON_LM_CHECKOUT" >&2
    exit 2
fi
CHECKOUT=$1
if [ ! -f "$CHECKOUT/pretrain_gpt.py" ]; then
    echo "$CHECKOUT: no pretrain_gpt.py (not a Megatron-LM checkout)" >&2
    exit 2
fi
minor=$(sed -n 's/^MINOR *= *\([0-9]*\).*/\1/p' "$CHECKOUT/megatron/core/package_info.py" 2>/dev/null || true)
case "$minor" in
    16|17) TAG=core_v0.16.1; PATCH="$HERE/pretrain_gpt_espace.patch" ;;
    19) TAG=core_v0.19.2; PATCH="$HERE/pretrain_gpt_espace-core_v0.19.2.patch" ;;
    *) echo "$CHECKOUT: megatron-core 0.${minor:-?} has no ESPACE patch here (0.16/0.17:" \
            "pretrain_gpt_espace.patch, 0.19: pretrain_gpt_espace-core_v0.19.2.patch);" \
            "launch/pretrain_gpt_espace.py works with every version from 0.16.1 to 0.19.2" >&2
       exit 2 ;;
esac

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
