#!/usr/bin/env bash
# Build the SGLang 0.5.11 carry kit for the lent GPU (Python 3.12, torch 2.11.0+cu130): download the wheels in
# wheels.txt, re-store them uncompressed (same files, same RECORD; ZIP_STORED) so that xz can squeeze the CUDA
# binaries (sglang-kernel's flash_ops.so deflates to 261 MiB, xz takes it far lower), add libnuma.so.1 (a NEEDED
# library of sgl_kernel's common_ops that a plain image may lack), tar + xz the lot and split it into parts of
# SK_PART_SIZE (default 13M: the working tree takes ~49 of the 64 MiB a device call carries) under DEST (default
# .sk, keep it ignored by git). Carry one part per device call (copy it to /tmp/sk there), then the last part with
# skit.tar.xz.sha256 and run scripts/peers_gpu.sh decode-sglang / serve-sglang (it runs reassemble.sh once). Set SK_WHEEL_CACHE to a folder of already-downloaded wheels to skip re-downloading.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); dest=${1:-.sk}; mkdir -p "$dest/whl"
if [ -n "${SK_WHEEL_CACHE:-}" ]; then cp -n "$SK_WHEEL_CACHE"/*.whl "$dest/whl/" 2>/dev/null || true; fi
while read -r spec; do
  [ -z "$spec" ] && continue
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$dest/whl" "$spec"
done < "$here/wheels.txt"
# Keep only the wheels wheels.txt names (a cache folder may hold more).
python3 - "$here/wheels.txt" "$dest/whl" <<'PY'
import os, re, sys
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
want = {tuple(norm(x) for x in l.strip().split("==")) for l in open(sys.argv[1]) if l.strip()}
for f in os.listdir(sys.argv[2]):
    name, ver = f.split("-")[:2]
    if (norm(name), norm(ver)) not in want:
        os.remove(os.path.join(sys.argv[2], f)); print("dropped (not in wheels.txt):", f)
PY
stage="$dest/stage"; rm -rf "$stage"; mkdir -p "$stage/whl" "$stage/lib"
# libnuma.so.1 from Debian's libnuma1 package (needs glibc >= 2.33); else this machine's copy.
tmpd=$(mktemp -d)
if ( cd "$tmpd" && apt-get download libnuma1 >/dev/null 2>&1 && dpkg-deb -x libnuma1_*.deb x ); then
  cp -L "$tmpd"/x/usr/lib/x86_64-linux-gnu/libnuma.so.1 "$stage/lib/libnuma.so.1"
else
  cp -L /usr/lib/x86_64-linux-gnu/libnuma.so.1 "$stage/lib/libnuma.so.1"
fi
rm -rf "$tmpd"
python3 - "$dest/whl" "$stage/whl" <<'PY'
import os, shutil, sys, zipfile
src, out = sys.argv[1:]
for f in sorted(os.listdir(src)):
    with zipfile.ZipFile(os.path.join(src, f)) as zi, zipfile.ZipFile(os.path.join(out, f), "w", zipfile.ZIP_STORED) as zo:
        for info in zi.infolist():
            n = zipfile.ZipInfo(info.filename, info.date_time); n.external_attr = info.external_attr
            n.compress_type = zipfile.ZIP_STORED
            with zi.open(info) as r, zo.open(n, "w", force_zip64=True) as w:
                shutil.copyfileobj(r, w, 1 << 20)
PY
( cd "$dest" && rm -f part* skit.tar.xz* && tar -C stage -cf - whl lib | xz -T0 -9 > skit.tar.xz \
  && sha256sum skit.tar.xz > skit.tar.xz.sha256 && split -b "${SK_PART_SIZE:-13M}" skit.tar.xz part && rm -rf skit.tar.xz stage )
cp "$here/reassemble.sh" "$dest/"
ls -la "$dest"
