#!/usr/bin/env bash
# Packaging check: build the sdist and the wheel (the wheel from the sdist, as
# `python -m build` does), check what they hold, install the wheel with
# torch==2.13.0 into a clean virtual environment outside the source tree and run
# .ci/wheel_smoke.py there. Fails, naming the files, when a file of the package
# is missing from the wheel, or LICENSE from the sdist or the wheel.
#
# Needs `build` in the calling environment (the dev extra). PYTHON picks the
# interpreter (default: python); the clean environment uses the same version.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Build from a copy of the files git sees (tracked, and untracked but not
# ignored: in a clean clone, the tracked ones): no build output (build/, dist/,
# *.egg-info) of an earlier build can leak in, and none is left in the working
# tree. A tracked file deleted in the working tree is skipped here and then
# reported missing below.
files="$work/files"
(cd "$root" && git ls-files -z --cached --others --exclude-standard) >"$files"
mkdir "$work/src"
(cd "$root" && tar --null --ignore-failed-read -T "$files" -cf -) | tar -C "$work/src" -xf -

echo "== building the sdist and the wheel"
if ! "$python" -m build --outdir "$work/dist" "$work/src" >"$work/build.log" 2>&1; then
    cat "$work/build.log"
    echo "check_wheel: the build failed (log above)" >&2
    exit 1
fi
sdist=$(ls "$work"/dist/*.tar.gz)
wheel=$(ls "$work"/dist/*.whl)
echo "built $(basename "$sdist") and $(basename "$wheel")"

list_zip='import sys, zipfile; print("\n".join(zipfile.ZipFile(sys.argv[1]).namelist()))'
"$python" -c "$list_zip" "$wheel" >"$work/wheel.txt"
tar -tzf "$sdist" >"$work/sdist.txt"

# Every file of the package must be in the wheel: the Python modules
# (a subpackage that package discovery misses), and the data files the package
# loads at run time (a package-data pattern that misses them).
# tuning_configs/README.md is left out on purpose (pyproject.toml says why).
missing=()
while IFS= read -r -d '' file; do
    case "$file" in
        convgru_triton/*) ;;
        *) continue ;;
    esac
    [ "$file" = convgru_triton/tuning_configs/README.md ] && continue
    grep -qxF "$file" "$work/wheel.txt" || missing+=("$file")
done <"$files"
if [ ${#missing[@]} -gt 0 ]; then
    echo "check_wheel: FAILED: package files missing from $(basename "$wheel"):" >&2
    printf '  %s\n' "${missing[@]}" >&2
    echo "(non-.py files need a pattern in pyproject.toml's [tool.setuptools.package-data])" >&2
    exit 1
fi
echo "the wheel holds every file of convgru_triton/ but tuning_configs/README.md"

grep -qE '^[^/]+/LICENSE$' "$work/sdist.txt" \
    || { echo "check_wheel: FAILED: LICENSE is not in $(basename "$sdist")" >&2; exit 1; }
grep -qE '^[^/]+\.dist-info/licenses/LICENSE$' "$work/wheel.txt" \
    || { echo "check_wheel: FAILED: LICENSE is not in $(basename "$wheel")'s .dist-info/licenses/" >&2; exit 1; }
echo "LICENSE in the sdist and the wheel"

echo "== installing torch==2.13.0 and the wheel into a clean environment"
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet "torch==2.13.0" "$wheel"

# From outside the source tree, with -I (no script directory, no PYTHONPATH on
# sys.path): only the installed package can be imported.
echo "== smoke test of the installed package"
cp "$root/.ci/wheel_smoke.py" "$work/wheel_smoke.py"
(cd "$work" && "$work/venv/bin/python" -I wheel_smoke.py "$work/src")
