"""Offload behaviour that the CPU parity tests do not see: no CPU-expert recompute under gradient checkpointing,
and (on a CUDA host) dense layers on the GPU with the experts on the engine, against stock transformers there."""
import pytest
import torch

import kt_sft
from tiny_models import CONFIGS, make_tiny_checkpoint


@pytest.fixture(scope="module")
def qwen3_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_moe")
    make_tiny_checkpoint("qwen3_moe", path)
    return path


def _count_engine_forwards(model) -> dict:
    calls = {"n": 0}
    for module in model.modules():
        layer = getattr(module, "kt_layer", None)
        if layer is not None:
            forward = layer.forward

            def counted(*args, _forward=forward, **kwargs):
                calls["n"] += 1
                return _forward(*args, **kwargs)

            layer.forward = counted
    return calls


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpoint_recompute_does_not_rerun_cpu_experts(qwen3_ckpt, reentrant):
    model = kt_sft.load_model(qwen3_ckpt, device="cpu", dtype=torch.float32, progress=False)
    moe_layers = sum(1 for m in model.modules() if hasattr(m, "kt_layer"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    model.train()
    calls = _count_engine_forwards(model)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls["n"] == moe_layers  # one engine forward per MoE layer, none in the recompute pass
    held = [m.kt_layer.saved_bytes for m in model.modules() if hasattr(m, "kt_layer")]
    assert all(b > 0 for b in held)  # bounded, reused buffers stay allocated for the next step
    model(input_ids=ids, labels=ids).loss.backward()
    assert [m.kt_layer.saved_bytes for m in model.modules() if hasattr(m, "kt_layer")] == held


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dense_on_gpu_matches_stock_on_gpu(qwen3_ckpt):
    from transformers import AutoModelForCausalLM

    before = torch.cuda.memory_allocated()
    ours = kt_sft.load_model(qwen3_ckpt, device="cuda", dtype=torch.float32, progress=False)
    on_gpu = torch.cuda.memory_allocated() - before
    tensors = list(ours.parameters()) + list(ours.buffers())
    assert all(t.device.type == "cuda" for t in tensors)
    # Every byte the load put on the GPU belongs to a dense parameter or buffer (the allocator rounds to 512 B).
    assert on_gpu <= sum(-(-t.numel() * t.element_size() // 512) * 512 for t in tensors)
    assert all(m.gate_up_proj.is_meta for m in ours.modules() if hasattr(m, "kt_layer"))
    stock = AutoModelForCausalLM.from_pretrained(qwen3_ckpt, dtype=torch.float32).cuda()
    ids = torch.randint(0, 128, (2, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, stock(ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-5


def test_refuses_when_host_ram_is_short(qwen3_ckpt, monkeypatch):
    import kt_sft.loader as loader

    monkeypatch.setattr(loader, "_free_host_bytes", lambda: 1024)
    with pytest.raises(MemoryError, match=r"host RAM .* available"):
        kt_sft.load_model(qwen3_ckpt, device="cpu", dtype=torch.float32, progress=False)


def test_quantized_checkpoint_names_its_format(qwen3_ckpt, tmp_path):
    import json
    import shutil

    path = tmp_path / "fp8"
    shutil.copytree(qwen3_ckpt, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes"}  # FP8 / INT4 / MXFP4 load: test_*_loading.py
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quant_method=bitsandbytes is not a format kt-sft reads"):
        kt_sft.load_model(path, device="cpu", dtype=torch.float32, progress=False)


def test_rule_file_defaults_apply_and_explicit_arguments_win(qwen3_ckpt, tmp_path):
    import kt_sft.engine as ke

    rule = tmp_path / "my_qwen3.yaml"
    text = (CONFIGS / "qwen3_moe.yaml").read_text()
    rule.write_text(text.replace("format: bf16", "format: fp32").replace("threads: auto", "threads: 1"))
    before = ke.num_threads()
    try:
        model = kt_sft.load_model(qwen3_ckpt, device="cpu", dtype=torch.bfloat16, rule=rule, progress=False)
        assert {m.kt_layer.dtype for m in model.modules() if hasattr(m, "kt_layer")} == {torch.float32}
        assert ke.num_threads() == 1
        model = kt_sft.load_model(qwen3_ckpt, device="cpu", dtype=torch.bfloat16, rule=rule, threads=2,
                                  format="bf16", progress=False)
        assert {m.kt_layer.dtype for m in model.modules() if hasattr(m, "kt_layer")} == {torch.bfloat16}
        assert ke.num_threads() == 2
    finally:
        ke.set_num_threads(before)
    rule.write_text(text.replace("model_type: qwen3_moe", "model_type: mixtral"))
    with pytest.raises(ValueError, match="is for model_type 'mixtral'"):
        kt_sft.load_model(qwen3_ckpt, device="cpu", rule=rule, progress=False)
    rule.write_text(text.replace("format: bf16", "engine_dtype: bfloat16"))  # the key's name before the format table
    with pytest.raises(ValueError, match="unknown defaults engine_dtype; allowed: format, threads .engine_dtype is now "
                                         "format"):
        kt_sft.load_model(qwen3_ckpt, device="cpu", rule=rule, progress=False)


def test_gpu_memory_check_counts_only_dense_weights(qwen3_ckpt, monkeypatch):
    """The routed experts never go to the GPU, so they must not count against its free memory."""
    import kt_sft.loader as loader

    seen = {}
    real = loader._check_memory

    def spy(expert_bytes, dense_bytes, *rest):
        seen.update(expert=expert_bytes, dense=dense_bytes)
        return real(expert_bytes, dense_bytes, *rest)

    monkeypatch.setattr(loader, "_check_memory", spy)
    model = kt_sft.load_model(qwen3_ckpt, device="cpu", dtype=torch.float32, progress=False)
    assert seen["dense"] == sum(p.numel() * p.element_size() for p in model.parameters())


def _loss_and_grads(model, reentrant=None):
    """Loss and dense-parameter gradients of one training step (gradients reach them through the experts' dx)."""
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
    model.train()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(a, b, rtol=1e-6):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.allclose(loss_a, loss_b, rtol=rtol, atol=0)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=rtol, atol=1e-7), name


def test_chunk_size_splits_engine_calls_without_changing_the_math(qwen3_ckpt):
    whole = kt_sft.load_model(qwen3_ckpt, device="cpu", dtype=torch.float32, progress=False)
    chunked = kt_sft.load_model(qwen3_ckpt, device="cpu", dtype=torch.float32, chunk_size=5, max_saved=8,
                                progress=False)
    calls = _count_engine_forwards(chunked)
    _assert_same_step(_loss_and_grads(whole), _loss_and_grads(chunked))
    moe_layers = sum(1 for m in chunked.modules() if hasattr(m, "kt_layer"))
    assert calls["n"] == moe_layers * 5  # 24 tokens in calls of <= 5
    # Default depth (4 saved forwards) and 24 tokens in 5 calls: each layer keeps what the batch needs.
    few_slots = kt_sft.load_model(qwen3_ckpt, device="cpu", dtype=torch.float32, chunk_size=5, progress=False)
    _assert_same_step(_loss_and_grads(whole), _loss_and_grads(few_slots))
    assert {m.kt_layer.max_saved for m in few_slots.modules() if hasattr(m, "kt_layer")} == {5}


def test_recompute_mode_reruns_experts_with_the_same_result(qwen3_ckpt):
    retain = kt_sft.load_model(qwen3_ckpt, device="cpu", dtype=torch.float32, progress=False)
    recompute = kt_sft.load_model(qwen3_ckpt, device="cpu", dtype=torch.float32, retain_activations=False,
                                  progress=False)
    calls = _count_engine_forwards(recompute)
    _assert_same_step(_loss_and_grads(retain, reentrant=True), _loss_and_grads(recompute, reentrant=True))
    assert calls["n"] == 2 * sum(1 for m in recompute.modules() if hasattr(m, "kt_layer"))


def test_experts_from_a_separate_directory(qwen3_ckpt, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    dense_dir, expert_dir = tmp_path / "dense", tmp_path / "experts"
    dense_dir.mkdir()
    expert_dir.mkdir()
    for name in ("config.json", "generation_config.json"):
        if (qwen3_ckpt / name).exists():
            shutil.copy(qwen3_ckpt / name, dense_dir / name)
    tensors = {}
    for shard in qwen3_ckpt.glob("*.safetensors"):
        tensors.update(load_file(shard))
    save_file({k: v for k, v in tensors.items() if ".experts." not in k}, dense_dir / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".experts." in k}, expert_dir / "experts.safetensors")

    whole = kt_sft.load_model(qwen3_ckpt, device="cpu", dtype=torch.float32, progress=False)
    split = kt_sft.load_model(dense_dir, device="cpu", dtype=torch.float32, expert_path=expert_dir, progress=False)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(whole(input_ids=ids).logits, split(input_ids=ids).logits)
    with pytest.raises(KeyError, match="expert tensor .* is missing"):
        kt_sft.load_model(dense_dir, device="cpu", dtype=torch.float32, progress=False)


def test_options_and_a_resolved_family(qwen3_ckpt, monkeypatch):
    """LoadOptions fields come as keywords on top of an options object (an unknown name is a TypeError naming it);
    a family the caller resolved already (LLaMA-Factory's checks) is used as given, not looked up again."""
    import kt_sft.loader as loader
    from kt_sft.load_options import LoadOptions
    from kt_sft.models import derive
    from kt_sft.models.registry import load_family_file

    with pytest.raises(TypeError, match="max_cached"):
        kt_sft.load_model(qwen3_ckpt, max_cached=3)
    with pytest.raises(ValueError, match="max_saved: expected an integer >= 1"):
        LoadOptions(max_saved=0)
    qwen3, mixtral = loader.checkpoint_family(qwen3_ckpt), load_family_file(CONFIGS / "mixtral.yaml")
    monkeypatch.setattr(derive, "derive_family", lambda *a: pytest.fail("the family was derived again"))
    model = kt_sft.load_model(qwen3_ckpt, LoadOptions(device="cpu", progress=False), family=qwen3,
                              dtype=torch.float32, max_saved=6)
    assert {m.kt_layer.max_saved for m in model.modules() if hasattr(m, "kt_layer")} == {6}
    with pytest.raises(ValueError, match="is for model_type 'mixtral'"):
        kt_sft.load_model(qwen3_ckpt, device="cpu", family=mixtral, progress=False)


def test_gpu_experts_option_and_launch_core(qwen3_ckpt, monkeypatch):
    """gpu_experts: "auto" by default, a fraction, or a clear error; without a CUDA device no share is built and
    the engine keeps its threads; with one, the pool leaves a core to the share's launching thread unless the
    threads were given (option or KT_SFT_THREADS)."""
    import kt_sft.engine as ke
    import kt_sft.loader as loader
    from kt_sft.load_options import LoadOptions

    assert LoadOptions().gpu_experts == "auto" and LoadOptions(gpu_experts=0.5).gpu_experts == 0.5
    for bad in ("all", 1.5, -0.1, True, None):
        with pytest.raises(ValueError, match=r"gpu_experts must be 'auto' or a fraction in \[0, 1\]"):
            LoadOptions(gpu_experts=bad)
    threads = ke.num_threads()
    model = kt_sft.load_model(qwen3_ckpt, device="cpu", progress=False)
    assert all(m.kt_policy.share is None for m in model.modules() if hasattr(m, "kt_policy"))
    assert ke.num_threads() == threads
    calls = []
    monkeypatch.setattr(loader.engine, "set_num_threads", calls.append)
    monkeypatch.delenv("KT_SFT_THREADS", raising=False)
    loader.reserve_launch_cores(0, shared=True)
    assert calls == [max(1, threads - loader.LAUNCH_CORES)]
    loader.reserve_launch_cores(4, shared=True)
    loader.reserve_launch_cores(0, shared=False)
    monkeypatch.setenv("KT_SFT_THREADS", "3")
    loader.reserve_launch_cores(0, shared=True)
    assert len(calls) == 1
