#!/usr/bin/env bash
# tests/layering_test.sh ROOT: fails when a source file includes a header from a layer above its
# own. The rule (STYLE.md): util <- model, data, dist <- trainer <- app; model, data and dist do not
# include each other; bench/ and tests/ may include anything. "diffuse/..." (generated build
# configuration) is allowed everywhere.
set -euo pipefail
root="${1:?usage: layering_test.sh REPO_ROOT}"
cd "$root"

allowed_for() {
  case "$1" in
    util) echo "util" ;;
    model) echo "util model" ;;
    data) echo "util data" ;;
    dist) echo "util dist" ;;
    trainer) echo "util model data dist trainer" ;;
    app) echo "util model data dist trainer app" ;;
  esac
}

violations=0
for layer in util model data dist trainer app; do
  [ -d "$layer" ] || { echo "layering_test: missing folder $layer/" >&2; exit 1; }
  allowed=" $(allowed_for "$layer") diffuse "
  while IFS= read -r line; do
    file="${line%%:*}"
    rest="${line#*:}"; rest="${rest#*:}"
    included="$(sed -E 's/^[[:space:]]*#[[:space:]]*include[[:space:]]*"([^"]+)".*/\1/' <<<"$rest")"
    top="${included%%/*}"
    [ "$top" = "$included" ] && continue  # a sibling header without a folder
    case " util model data dist trainer app diffuse " in *" $top "*) ;; *) continue ;; esac
    if [[ "$allowed" != *" $top "* ]]; then
      echo "layering violation: $file includes \"$included\" ($layer/ may include: $(allowed_for "$layer"))"
      violations=$((violations + 1))
    fi
  done < <(grep -rnE '^[[:space:]]*#[[:space:]]*include[[:space:]]*"' "$layer" --include='*.h' --include='*.cpp' || true)
done
if [ "$violations" -gt 0 ]; then
  echo "layering_test: $violations include(s) cross the layer rule" >&2
  exit 1
fi
echo "layering_test: every include in util/ model/ data/ dist/ trainer/ app/ follows util <- model, data, dist <- trainer <- app"
