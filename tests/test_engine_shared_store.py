"""The shared expert store (kt_sft/engine/shared_store.py, csrc/shared_segment.h): layers packed into one shared
file by one process and mapped read-only by another compute bitwise what private layers compute, in every format;
the file's name goes when asked (the mappings stay), stale files of dead processes are swept, misuse is refused."""
import os
import subprocess
import sys

import pytest
import torch

import kt_sft.engine as ke
from kt_sft import _engine
from kt_sft.engine.shared_store import PREFIX, SharedExpertStore, offsets, remove_stale, store_path

E, H, I = 5, 40, 24  # odd sizes: padded panels, partial scale blocks


def _weights(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)


def _call(layer, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, H, generator=g).to(layer.dtype)
    ids, w = torch.randint(0, E, (9, 2), generator=g), torch.rand(9, 2, generator=g)
    y, handle = layer.forward(x, ids, w, save_for_backward=True)
    dx, dw = layer.backward(handle, torch.randn(9, H, generator=g).to(layer.dtype))
    return y, dx, dw


@pytest.mark.parametrize("fmt", list(ke.FORMATS))
def test_packed_into_the_store_and_mapped_read_only_compute_as_private(fmt, tmp_path, monkeypatch):
    monkeypatch.setenv("KT_SFT_SHM_DIR", str(tmp_path))
    weights = [_weights(0), _weights(1)]
    private = [ke.ExpertLayer.from_fused(gu, d, fmt) for gu, d in weights]
    packer = [ke.ExpertLayer(E, H, I, fmt) for _ in weights]
    reader = [ke.ExpertLayer(E, H, I, fmt) for _ in weights]
    path = store_path("test")
    store = SharedExpertStore.create(path, packer)
    for layer, (gu, d) in zip(packer, weights):
        layer.load_fused(gu, d)
    mapped = SharedExpertStore.open(path, reader)
    assert store.unlink() and not path.exists() and not list(tmp_path.iterdir())
    assert mapped.nbytes == offsets(reader)[1] == sum(layer.storage_bytes for layer in reader)
    assert all(layer.storage_bytes >= layer.packed_bytes and not layer.missing_weights() for layer in reader)
    for ours, theirs, mine in zip(private, packer, reader):
        for a, b, c in zip(_call(ours), _call(theirs), _call(mine)):
            assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(Exception, match="packed by another process"):
        reader[0].set_projection("down", weights[0][1])


def test_misuse_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("KT_SFT_SHM_DIR", str(tmp_path))
    layer = ke.ExpertLayer(E, H, I, "bf16")
    path = store_path("misuse")
    store = SharedExpertStore.create(path, [layer])
    with pytest.raises(RuntimeError, match="cannot create"):  # one store per name
        _engine.SharedSegment(str(path), layer.storage_bytes, True)
    with pytest.raises(RuntimeError, match="expected"):  # another shape of model than the file's
        SharedExpertStore.open(path, [ke.ExpertLayer(E + 1, H, I, "bf16")])
    loaded = ke.ExpertLayer.from_fused(*_weights(0), "bf16")
    with pytest.raises(Exception, match="packed into this layer already"):
        loaded.use_storage(store.segment, 0, packed=True)
    with pytest.raises(Exception, match="page-aligned"):
        ke.ExpertLayer(E, H, I, "bf16").use_storage(store.segment, 100, packed=True)
    read_only = _engine.SharedSegment(str(path), layer.storage_bytes, False)
    with pytest.raises(Exception, match="read-only"):
        ke.ExpertLayer(E, H, I, "bf16").use_storage(read_only, 0, packed=False)
    store.unlink()
    with pytest.raises(RuntimeError, match="cannot open"):
        _engine.SharedSegment(str(path), layer.storage_bytes, False)


def test_stale_files_of_dead_processes_are_swept(tmp_path, monkeypatch):
    monkeypatch.setenv("KT_SFT_SHM_DIR", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, live = store_path("x", int(dead.stdout)), store_path("x")
    stale.write_bytes(b"0")
    live.write_bytes(b"0")
    (tmp_path / "unrelated").write_bytes(b"0")
    assert remove_stale() == [stale.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "unrelated"])
    assert live.name.startswith(PREFIX) and live.name.endswith(f"-pid{os.getpid()}")
