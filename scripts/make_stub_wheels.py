#!/usr/bin/env python3
"""Build the two torch-companion wheels a CPU-only venv needs (called by setup_cpu.sh).

* torchvision: METADATA-ONLY wheel (no importable module).  llamafactory declares
  `torchvision>=0.19` but never imports it; transformers/peft/trl only use it behind
  `is_torchvision_available()`, which needs `importlib.util.find_spec("torchvision")`.
  With no module that check is False, so transformers stays on its PIL/numpy paths
  instead of importing a broken or empty torchvision.  (PyPI's real wheels are CUDA
  builds that fail to load on CPU torch.)
* torchaudio: the PyPI wheel with its native libs (torchaudio/lib/*.so, linked against
  libtorch_cuda/libcudart) removed.  torchaudio's `_extension._load_lib()` returns False
  when the .so files are absent, so `import torchaudio` succeeds in pure-Python mode;
  what llamafactory uses (`torchaudio.functional.resample`) is pure Python.

Both get a local version label (+stub / +nolib) so constraints-cpu.txt can pin exactly
these builds and pip can never "upgrade" them to the PyPI CUDA wheels.
Only the standard library is used (runs before anything else is installed).
"""
import argparse
import base64
import hashlib
import io
import zipfile
from pathlib import Path

ZIP_DATE = (2020, 1, 1, 0, 0, 0)  # fixed timestamps: reproducible wheels


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def _write_wheel(out: Path, files: dict, dist_info: str) -> Path:
    """Write {arcname: bytes} plus a freshly computed RECORD as a wheel file."""
    record_name = f"{dist_info}/RECORD"
    files = {k: v for k, v in files.items() if k != record_name}
    record = "\n".join([_record_line(k, v) for k, v in files.items()] + [f"{record_name},,", ""])
    files[record_name] = record.encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    out.write_bytes(buf.getvalue())
    return out


def _wheel_meta(tag: str) -> bytes:
    return (f"Wheel-Version: 1.0\nGenerator: kt-sft make_stub_wheels\n"
            f"Root-Is-Purelib: true\nTag: {tag}\n").encode()


def make_torchvision(out_dir: Path, version: str) -> Path:
    dist_info = f"torchvision-{version}.dist-info"
    metadata = (f"Metadata-Version: 2.1\nName: torchvision\nVersion: {version}\n"
                "Summary: Metadata-only placeholder (no code) for CPU-only kt-sft venvs\n").encode()
    files = {f"{dist_info}/METADATA": metadata, f"{dist_info}/WHEEL": _wheel_meta("py3-none-any")}
    return _write_wheel(out_dir / f"torchvision-{version}-py3-none-any.whl", files, dist_info)


def make_torchaudio(out_dir: Path, src_wheel: Path, local: str) -> Path:
    with zipfile.ZipFile(src_wheel) as zf:
        files = {n: zf.read(n) for n in zf.namelist() if not n.endswith("/")}
    old_di = next(n.split("/")[0] for n in files if n.split("/")[0].endswith(".dist-info"))
    old_version = old_di[len("torchaudio-"):-len(".dist-info")]
    version = f"{old_version.split('+')[0]}+{local}"
    new_di = f"torchaudio-{version}.dist-info"
    repacked = {}
    for name, data in files.items():
        if name.startswith("torchaudio/lib/") and ".so" in name:
            continue  # the CUDA-linked native extension: dropped on purpose
        if name.startswith(old_di + "/"):
            name = new_di + name[len(old_di):]
            if name == f"{new_di}/METADATA":
                data = b"".join(f"Version: {version}\n".encode() if line.startswith(b"Version:") else line
                                for line in io.BytesIO(data))
            elif name == f"{new_di}/WHEEL":
                data = _wheel_meta("py3-none-any")  # no native code left
        elif name == "torchaudio/version.py":  # was e.g. '2.11.0+cu130': say what this build is
            data = b"".join(f"__version__ = '{version}'\n".encode() if line.startswith(b"__version__") else line
                            for line in io.BytesIO(data))
        repacked[name] = data
    return _write_wheel(out_dir / f"torchaudio-{version}-py3-none-any.whl", repacked, new_di)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--torchvision-version", default="0.28.0+stub")
    ap.add_argument("--torchaudio-wheel", required=True, type=Path, help="PyPI torchaudio wheel to strip")
    ap.add_argument("--torchaudio-local", default="nolib", help="local version label for the stripped build")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(make_torchvision(args.out, args.torchvision_version))
    print(make_torchaudio(args.out, args.torchaudio_wheel, args.torchaudio_local))


if __name__ == "__main__":
    main()
