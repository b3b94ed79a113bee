#!/usr/bin/env bash
# Builds the self-contained moecheck (static Swift runtime) and packs it with OpenBLAS's shared
# libraries into .carry/moecheck.tar.xz for a GPU machine without Swift (glibc >= 2.35).
set -euo pipefail
cd "$(dirname "$0")/.."
swift build -c release --static-swift-stdlib --scratch-path .build-static --product moecheck
bin=$(swift build -c release --static-swift-stdlib --scratch-path .build-static --show-bin-path)/moecheck
stage=$(mktemp -d)
cp "$bin" "$stage/"
for lib in libopenblas.so.0 libgfortran.so.5 libquadmath.so.0; do
  cp "$(ldconfig -p | awk -v l="$lib" '$1 == l { print $NF; exit }')" "$stage/$lib"
done
# Debian's libopenblas.so.0 is an alternatives link to the pthread build: copy the real file.
cp -L /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 "$stage/libopenblas.so.0"
mkdir -p .carry
tar -C "$stage" -cJf .carry/moecheck.tar.xz .
rm -rf "$stage"
ls -l .carry/moecheck.tar.xz
