#!/usr/bin/env bash
# The Debian packages the tests use, shared by `make setup` and .ci/run:
#   chromium               /usr/bin/chromium: report.html and the Gradio demo in headless Chromium
#   dataset-fashion-mnist  /usr/share/datasets/fashion-mnist: the Fashion-MNIST reader on the real IDX files
#
#   bash .ci/system-packages.sh [--check] [EXTRA_PACKAGE...]
#
# A package counts as present when its path above exists (an extra package: when dpkg lists it as
# installed), so on a set-up machine this is a cheap check that never calls apt-get. Missing
# packages are installed with apt-get as root (`apt-get update` first only when apt does not know
# them); otherwise the sudo command is printed and the tests that need them skip, or, under
# CI=true, fail, so the script exits 1 there. --check installs nothing: it names what is missing
# (on stderr) and exits 1 if anything is. tests/conftest.py (SYSTEM_PACKAGES) checks the same paths.
set -euo pipefail

declare -A PATH_OF=(
  [chromium]=/usr/bin/chromium
  [dataset-fashion-mnist]=/usr/share/datasets/fashion-mnist
)
packages=(chromium dataset-fashion-mnist)
check_only=0
for arg in "$@"; do
  case "$arg" in
    --check) check_only=1 ;;
    -*) echo "usage: $0 [--check] [EXTRA_PACKAGE...]" >&2; exit 2 ;;
    *) packages+=("$arg") ;;
  esac
done

present() {
  local path="${PATH_OF[$1]:-}"
  if [[ -n "$path" ]]; then
    [[ -e "$path" ]]
  else
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
  fi
}

missing_of() {
  local p
  for p in "$@"; do present "$p" || echo "$p"; done
}

mapfile -t missing < <(missing_of "${packages[@]}")
if ((${#missing[@]} == 0)); then
  echo "system packages present: ${packages[*]}"
  exit 0
fi

install="apt-get install -y --no-install-recommends ${missing[*]}"
known=1
for p in "${missing[@]}"; do
  apt-cache show "$p" >/dev/null 2>&1 || known=0
done

if ((check_only)) || ((EUID != 0)); then
  echo "system packages missing: ${missing[*]}" >&2
  if ((known)); then
    echo "install them with:  sudo $install" >&2
  else
    echo "install them with:  sudo apt-get update && sudo $install" >&2
  fi
  if ((check_only)); then exit 1; fi
  if [[ "${CI:-}" == true ]]; then
    echo "CI=true: the tests that need them would fail" >&2
    exit 1
  fi
  echo "(the tests that need them are skipped until then)" >&2
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
if ((!known)); then
  apt-get update -qq
fi
echo "+ $install"
# Stale package lists can name files the mirror no longer has: refresh them once and retry.
if ! apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

mapfile -t still < <(missing_of "${missing[@]}")
if ((${#still[@]})); then
  echo "still missing after apt-get install (see the paths in $0): ${still[*]}" >&2
  exit 1
fi
echo "system packages installed: ${missing[*]}"
