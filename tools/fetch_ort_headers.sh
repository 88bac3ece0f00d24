#!/usr/bin/env bash
# Fetch the ONNX Runtime C/C++ API headers (ORT_API_VERSION 21) from Debian trixie's
# libonnxruntime-dev into DEST (default: <repo>/.cache/ort-include), without installing anything.
# Idempotent: returns at once when DEST already holds the headers.
# Not on Debian? Point TOPT_ORT_INCLUDE_DIR at your ONNX Runtime release's include/ instead.
set -euo pipefail

dest=${1:-"$(cd "$(dirname "$0")/.." && pwd)/.cache/ort-include"}
if [[ -f "$dest/onnxruntime_cxx_api.h" ]]; then
  exit 0
fi
command -v apt-get >/dev/null && command -v dpkg >/dev/null \
  || { echo "fetch_ort_headers: needs apt-get and dpkg (Debian); set TOPT_ORT_INCLUDE_DIR instead" >&2; exit 1; }
sources=/etc/apt/sources.list.d/debian.sources
[[ -f $sources ]] || { echo "fetch_ort_headers: no $sources; set TOPT_ORT_INCLUDE_DIR instead" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
uri=$(awk '/^URIs:/{print $2; exit}' "$sources")   # the machine's own archive
# The .sources suffix matters: apt reads deb822 only from files named so.
printf 'Types: deb\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
  "$uri" > "$work/trixie.sources"
opts=(-o "Dir::Etc::sourcelist=$work/trixie.sources" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$work/lists"
      -o "Dir::Cache=$work/cache" -o APT::Sandbox::User=root)
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
apt-get "${opts[@]}" update -qq
(cd "$work" && apt-get "${opts[@]}" download -qq libonnxruntime-dev)
dpkg -x "$work"/libonnxruntime-dev_*.deb "$work/x"

# Install atomically so an interrupted run never leaves a half-filled cache.
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.tmp"
cp -r "$work/x/usr/include/onnxruntime" "$dest.tmp"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "fetch_ort_headers: headers in $dest"
