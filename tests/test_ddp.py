"""Data parallel and FSDP2 of the dense part (kt_sft/distributed.py, issue 22) on CPU with gloo.

Worker runs (tests/ddp_worker.py, two plain processes with the torch.distributed variables, as torchrun sets them):
one shared expert store per host, mapped by both ranks and gone from the file system once mapped, the experts'
memory counted once (the ranks' Pss of the store add up to one copy), identical adapters after steps on different
data; the same steps with the dense part under FSDP2 (`fully_shard` on a CPU mesh) give data parallel's losses,
clipped norms and adapter; mismatched settings, a packer that fails and a rank that dies stop every rank with a
clear error.
Through the real CLI (slow): `FORCE_TORCHRUN=1 NPROC_PER_NODE=2 USE_KT=1 llamafactory-cli train` gives stock
LLaMA-Factory's 2-rank losses (fp32) on tiny models of several families, with and without expert LoRA; a resumed
2-rank run is exact; two "hosts" on this machine (NNODES=2) keep one store each and train like one host.
`USE_KT=1 accelerate launch --config_file examples/accelerate/fsdp2_kt.yaml -m llamafactory.launcher` (FSDP2, as
LLaMA-Factory runs FSDP) gives stock LLaMA-Factory's 2-rank FSDP2 losses with and without expert LoRA, and the
data-parallel run's adapter. Accelerate runs FSDP on GPUs only (a CPU process group drops its plugin): the shim
in tests/ddp_shims keeps it on both sides.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from llamafactory_run import llamafactory_cli

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "ddp_worker.py"
SHIMS = TESTS / "ddp_shims"  # sitecustomize: stock PEFT target_parameters, CPU-only resume (see there)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           # LLaMA-Factory's launcher runs `torchrun` by name: this interpreter's environment first
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    env.pop("KT_SFT_THREADS", None)  # the ranks split the cores themselves
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny qwen3_moe with 12.6 MB of fp32 experts (2 MoE layers x 32 experts of width 256)."""
    from tiny_models import make_tiny_model

    path = tmp_path_factory.mktemp("ddp") / "model"
    make_tiny_model("qwen3_moe", num_experts=32, moe_intermediate_size=256).save_pretrained(path)
    return path


def _run_ranks(mode: str, model: Path, out: Path, world: int = 2, timeout: float = 300, **env) -> list[dict]:
    """The worker as `world` ranks of one host; each rank's report (a rank that wrote none: {})."""
    out.mkdir(parents=True, exist_ok=True)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(WORKER), mode, str(model), str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(r), LOCAL_RANK=str(r),
                                       WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", **env))
             for r in range(world)]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    reports = []
    for r in range(world):
        path = out / f"rank{r}.json"
        reports.append(json.loads(path.read_text()) if path.exists() else {"log": logs[r][-3000:]})
    return reports


def _store_files() -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob("kt-sft-experts-*"))


@pytest.fixture(scope="module")
def ddp_train(model_dir, tmp_path_factory):
    """The worker's `train` mode on 2 ranks: (the store files before, each rank's report)."""
    before = _store_files()
    return before, _run_ranks("train", model_dir, tmp_path_factory.mktemp("ddp_train"))


def test_two_ranks_share_one_store_and_keep_identical_adapters(ddp_train):
    before, (a, b) = ddp_train
    assert "error" not in a and "error" not in b, (a.get("traceback"), b.get("traceback"))
    assert a["stores"] == b["stores"] and len(a["stores"]) == 1  # one store, both ranks in it
    store = a["stores"][0]
    assert a["inside"] == b["inside"] == [True, True]  # every layer's panels lie in the shared mapping
    assert a["store_files"] == b["store_files"] == [] or _store_files() == before  # unlinked once mapped
    assert a["mappings"][store]["deleted"] and b["mappings"][store]["deleted"]
    size = a["mappings"][store]["size"]
    assert a["packed"] <= size < a["packed"] + 64 * 4096
    after = [r["mappings_after"][store] for r in (a, b)]
    assert all(m["rss"] > 0 for m in after)  # both ranks computed from it
    assert sum(m["pss"] for m in after) <= size  # the experts' memory counted once on this host
    assert a["threads"] == b["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    assert "experts shared by 2 rank(s) of this host (1 host(s), 2 ranks)" in a["summary"]
    assert a["ignored_by_ddp"] == 8  # 2 layers x 2 expert parameters x (lora_A, lora_B)
    assert a["losses"] != b["losses"]  # each rank trained on its own data...
    assert a["param_sums"] == b["param_sums"]  # ...and both hold the same adapter
    assert _store_files() == before


def test_fsdp2_of_the_dense_part_trains_like_data_parallel(model_dir, tmp_path, ddp_train):
    """The same steps with the dense part sharded by FSDP2 (fully_shard on the CPU mesh over gloo): the expert-LoRA
    factors stay plain CPU tensors outside it (averaged by kt-sft), the rest are DTensors; each rank's losses, the
    clipped norms (one norm over the sharded and the plain gradients) and the adapter are data parallel's."""
    _, ddp = ddp_train
    fsdp = _run_ranks("fsdp", model_dir, tmp_path)
    for rank, (got, want) in enumerate(zip(fsdp, ddp)):
        assert "error" not in got, got.get("traceback", got.get("log"))
        assert got["losses"] == pytest.approx(want["losses"], abs=1e-5), rank
        assert got["norms"] == pytest.approx(want["norms"], rel=1e-5), rank
        assert got["param_sums"] == pytest.approx(want["param_sums"], abs=1e-5), rank
        assert len(got["plain"]) == 8 and all("experts" in n for n in got["plain"])  # 2 layers x 2 params x A, B
        assert got["param_groups"] == 2  # AdamW's one group, split: DTensors / the factors
    assert fsdp[0]["param_sums"] == fsdp[1]["param_sums"]


@pytest.mark.slow
def test_mismatched_settings_stop_every_rank(model_dir, tmp_path):
    reports = _run_ranks("mismatch", model_dir, tmp_path)
    for report in reports:
        assert "the ranks disagree on load option format" in report["error"], report
        assert "fp32" in report["error"] and "bf16" in report["error"]


@pytest.mark.slow
def test_a_failing_packer_stops_every_rank_with_its_error(model_dir, tmp_path):
    a, b = _run_ranks("badstore", model_dir, tmp_path, KT_SFT_SHM_DIR=str(tmp_path / "missing"))
    assert "missing" in a["error"]
    assert b["error"].startswith("RuntimeError: kt-sft: loading the model failed on rank 0") and "missing" in b["error"]


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_others_with_a_clear_error(model_dir, tmp_path):
    start = time.time()
    a, b = _run_ranks("die", model_dir, tmp_path, timeout=200)
    assert "another rank stopped answering" in a["error"], a
    assert b == {"log": b["log"]}  # rank 1 exited without a report
    assert time.time() - start < 150  # no hang until a long timeout


def test_fsdp_leaves_out_exactly_the_expert_lora_factors(monkeypatch):
    """What kt-sft hands accelerate's FSDP2 plugin: the modules holding the expert-LoRA factors and nothing else
    (besides the user's own ignored modules), cpu_ram_efficient_loading off; a factor beside another parameter in
    one module is refused. The dense part loads to host RAM under FSDP."""
    import types

    from peft import LoraConfig

    import kt_sft
    from kt_sft import distributed
    from kt_sft.llamafactory.patches import _leave_engine_out
    from kt_sft.load_options import LoadOptions
    from kt_sft.models.expert_lora import expert_lora_parameters, get_peft_model

    model = kt_sft.load_model(REPO / "examples" / "demo" / "model", device="cpu", dtype=torch.float32, format="fp32",
                              progress=False)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], target_parameters=["experts"],
                                             lora_dropout=0.0))
    factors = {id(p) for p in expert_lora_parameters(model)}
    plugin = types.SimpleNamespace(cpu_ram_efficient_loading=True, ignored_modules=r".*layers\.0\.input_layernorm")
    _leave_engine_out(plugin, model)
    assert plugin.cpu_ram_efficient_loading is False
    user, *ours = plugin.ignored_modules
    assert user is model.base_model.model.model.layers[0].input_layernorm
    assert {id(p) for m in ours for p in m.parameters()} == factors and len(factors) == 8
    holder = next(m for m in ours[0].modules() if any(id(p) in factors for p in m.parameters(recurse=False)))
    holder.register_parameter("stray", torch.nn.Parameter(torch.zeros(1)))  # beside a factor in its own module
    with pytest.raises(RuntimeError, match="share a module with other parameters; FSDP cannot leave them out"):
        distributed.fsdp_ignored_modules(model, expert_lora_parameters(model))
    options = LoadOptions(device="cpu", dense_device="cpu")
    assert options.dense_device == torch.device("cpu") and LoadOptions(device="cpu").dense_device == options.device


def test_fsdp_keeps_frozen_weights_in_their_dtype_when_accelerate_upcasts():
    """accelerate's FSDP2 upcast under mixed precision (`model.to(torch.float32)`) leaves frozen parameters as they
    are and upcasts the rest; other `to` calls and the model after the prepare are untouched."""
    from kt_sft import distributed

    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    model.weight.requires_grad_(False)
    model.register_buffer("scale", torch.ones(2, dtype=torch.bfloat16))
    with distributed.frozen_dtype_kept(model):
        assert model.to(torch.float32) is model
        assert (model.weight.dtype, model.bias.dtype, model.scale.dtype) == (torch.bfloat16, torch.float32,
                                                                              torch.float32)
        model.to(dtype=torch.float64)  # not accelerate's upcast: the module's own
        assert model.weight.dtype == torch.float64
    assert "to" not in model.__dict__


def test_store_space_is_checked_before_packing(tmp_path, monkeypatch):
    import kt_sft.engine as ke
    from kt_sft.engine import shared_store

    monkeypatch.setenv("KT_SFT_SHM_DIR", str(tmp_path))
    monkeypatch.setattr(shared_store, "free_bytes", lambda directory: 4096)
    with pytest.raises(MemoryError, match="shared expert store needs .* --shm-size"):
        shared_store.SharedExpertStore.create(shared_store.store_path("t"), [ke.ExpertLayer(8, 64, 32, "bf16")])
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- through LLaMA-Factory's CLI


def _config(tmp: Path, name: str, model: Path, use_kt: bool, **overrides) -> Path:
    cfg = dict(model_name_or_path=str(model), stage="sft", do_train=True, finetuning_type="lora", lora_target="all",
               lora_rank=8, lora_alpha=16, dataset="kt_demo", dataset_dir=str(REPO / "examples" / "demo" / "data"),
               template="qwen3_nothink", cutoff_len=128, overwrite_cache=True, preprocessing_num_workers=1,
               output_dir=str(tmp / name), logging_steps=1, save_steps=4, max_steps=4, overwrite_output_dir=True,
               report_to="none", per_device_train_batch_size=2, learning_rate=1e-2, num_train_epochs=1, seed=42)
    if use_kt:
        cfg.update(use_kt=True, kt_backend="FP32")
    cfg.update(overrides)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(cfg: Path, use_kt: bool, nodes: int = 1, node: int = 0, port: int = 0, **env) -> subprocess.Popen:
    extra = dict(USE_KT="1" if use_kt else "0", FORCE_TORCHRUN="1", NPROC_PER_NODE=str(2 // nodes),
                 MASTER_PORT=str(port or _free_port()), PYTHONPATH=os.pathsep.join([str(REPO), str(SHIMS)]), **env)
    if nodes > 1:
        extra.update(NNODES=str(nodes), NODE_RANK=str(node), MASTER_ADDR="127.0.0.1")
    log = open(cfg.with_suffix(f".node{node}.log"), "w")
    return subprocess.Popen(llamafactory_cli("train", str(cfg)), env=_env(**extra), stdout=log,
                            stderr=subprocess.STDOUT)


# A rank that finished training has, rarely, died at interpreter exit with SIGABRT ("terminate called without an
# active exception", 1 of ~60 two-rank runs on 2026-12-06, on kt-sft's side once; cause not found: no thread of the
# engine outlives its join, a torch-only repro never failed). Such a run is repeated once, saying so; any other
# failure, or the same one twice, fails the test. PYTHONFAULTHANDLER prints every thread's stack if it recurs.
EXIT_ABORT = "terminate called without an active exception"


def _train(cfg: Path, use_kt: bool, **env) -> str:
    for attempt in (1, 2):
        proc = _launch(cfg, use_kt, PYTHONFAULTHANDLER="1", **env)
        proc.wait(timeout=900)
        log = cfg.with_suffix(".node0.log").read_text()
        if proc.returncode == 0 or attempt == 2 or not _aborted_at_exit(log):
            break
        print(f"[test_ddp] {cfg.name}: a rank aborted at exit after training completed; running it again")
    assert proc.returncode == 0, log[-4000:]
    return log


def _aborted_at_exit(log: str) -> bool:
    return EXIT_ABORT in log and "Training completed" in log.split(EXIT_ABORT)[0]


def _losses(out: Path) -> dict[int, float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def _with_tokenizer(model: Path) -> Path:
    demo = REPO / "examples" / "demo" / "model"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(demo / name, model / name)
    return model


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("families")
    models = {"qwen3_moe": REPO / "examples" / "demo" / "model"}
    for family in ("deepseek_v3", "mixtral"):
        make_tiny_model(family, vocab_size=1024).save_pretrained(root / family)
        models[family] = _with_tokenizer(root / family)
    return models


EXPERT_TARGETS = "mlp.experts.gate_up_proj,mlp.experts.down_proj"


@pytest.fixture(scope="module")
def ddp_with_expert_lora(family_models, tmp_path_factory):
    """kt-sft's 2-rank data-parallel run with expert LoRA on the demo model: (output dir, log); shared by the stock
    comparison and the FSDP2 one."""
    tmp = tmp_path_factory.mktemp("ddp_experts")
    log = _train(_config(tmp, "kt", family_models["qwen3_moe"], True, lora_target="all,experts"), True)
    return tmp / "kt", log


@pytest.mark.slow
@pytest.mark.parametrize("family,experts", [("qwen3_moe", False), ("qwen3_moe", True), ("deepseek_v3", True),
                                            ("mixtral", True)])
def test_two_ranks_train_like_stock_llamafactory(family_models, tmp_path, family, experts, request):
    model = family_models[family]
    if (family, experts) == ("qwen3_moe", True):
        ours, log = request.getfixturevalue("ddp_with_expert_lora")
    else:
        target = "all,experts" if experts else "all"
        ours, log = tmp_path / "kt", _train(_config(tmp_path, "kt", model, True, lora_target=target), True)
    stock = _config(tmp_path, "stock", model, False)
    _train(stock, False, **(dict(KT_TEST_TARGET_PARAMETERS=EXPERT_TARGETS) if experts else {}))
    assert "experts shared by 2 rank(s) of this host (1 host(s), 2 ranks)" in log
    got, want = _losses(ours), _losses(tmp_path / "stock")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=1e-4), (step, got, want)


@pytest.mark.slow
def test_resumed_two_rank_run_is_exact(family_models, tmp_path):
    model = family_models["qwen3_moe"]
    _train(_config(tmp_path, "full", model, True, lora_target="all,experts", save_steps=2), True)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    _train(_config(tmp_path, "resumed", model, True, lora_target="all,experts", save_steps=2,
                   resume_from_checkpoint=str(checkpoint), overwrite_output_dir=False), True)
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert {3, 4} <= set(resumed)
    assert [resumed[s] for s in (3, 4)] == [full[s] for s in (3, 4)]


@pytest.mark.slow
def test_two_hosts_keep_one_store_each_and_train_like_one_host(family_models, tmp_path):
    """NNODES=2 on this machine: two torchrun launches of one rank each, node ranks 0 and 1: each "host" packs its
    own store; the global ranks and their data are those of one host with 2 ranks, so the losses are too."""
    model = family_models["qwen3_moe"]
    port = _free_port()
    cfg = _config(tmp_path, "nodes", model, True, lora_target="all,experts")
    procs = [_launch(cfg, True, nodes=2, node=n, port=port) for n in (0, 1)]
    for proc in procs:
        proc.wait(timeout=900)
    logs = [cfg.with_suffix(f".node{n}.log").read_text() for n in (0, 1)]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "experts shared by 1 rank(s) of this host (2 host(s), 2 ranks)" in logs[0]
    _train(_config(tmp_path, "one", model, True, lora_target="all,experts"), True)
    got, want = _losses(tmp_path / "nodes"), _losses(tmp_path / "one")
    assert got == pytest.approx(want, abs=1e-6)


# ---------------------------------------------------------------- FSDP2 through accelerate, as LLaMA-Factory runs it
FSDP2_CONFIG = REPO / "examples" / "accelerate" / "fsdp2_kt.yaml"


def _train_fsdp(cfg: Path, use_kt: bool, **env) -> str:
    """`accelerate launch --config_file examples/accelerate/fsdp2_kt.yaml -m llamafactory.launcher cfg` (LLaMA-Factory's
    FSDP recipe, `src/train.py` being that module) on 2 CPU ranks in fp32; the log."""
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(FSDP2_CONFIG),
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
               "-m", "llamafactory.launcher", str(cfg)]
    extra = dict(USE_KT="1" if use_kt else "0", PYTHONPATH=os.pathsep.join([str(REPO), str(SHIMS)]),
                 PYTHONFAULTHANDLER="1", **env)
    log_path = cfg.with_suffix(".log")
    for attempt in (1, 2):  # as _train: one more run only for an abort at exit after training completed
        with open(log_path, "w") as log:
            proc = subprocess.run(command, env=_env(**extra), stdout=log, stderr=subprocess.STDOUT, timeout=900)
        log = log_path.read_text()
        if proc.returncode == 0 or attempt == 2 or not _aborted_at_exit(log):
            break
        print(f"[test_ddp] {cfg.name}: a rank aborted at exit after training completed; running it again")
    assert proc.returncode == 0, log[-4000:]
    return log


def _adapter(out: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors")), json.loads((out / "adapter_config.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("experts", [False, True])
def test_fsdp2_through_accelerate_trains_like_stock_llamafactory(family_models, tmp_path, experts, request):
    """FSDP2 of the dense part: stock LLaMA-Factory's 2-rank FSDP2 losses (PEFT LoRA on the routed experts of the
    stock model as the reference for expert LoRA); the adapter is an ordinary PEFT adapter, stock's keys and
    config, and with expert LoRA equal to the data-parallel run's; a resumed run continues exactly."""
    model = family_models["qwen3_moe"]
    target = "all,experts" if experts else "all"
    log = _train_fsdp(_config(tmp_path, "kt", model, True, lora_target=target, save_steps=2), True)
    _train_fsdp(_config(tmp_path, "stock", model, False),
                False, **(dict(KT_TEST_TARGET_PARAMETERS=EXPERT_TARGETS) if experts else {}))
    assert "experts shared by 2 rank(s) of this host (1 host(s), 2 ranks)" in log
    assert f"FSDP2 shards the dense part; {8 if experts else 0} expert-LoRA factors stay out of it" in log
    got, want = _losses(tmp_path / "kt"), _losses(tmp_path / "stock")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=1e-4), (step, got, want)
    (ours, config), (theirs, stock_config) = _adapter(tmp_path / "kt"), _adapter(tmp_path / "stock")
    assert sorted(ours) == sorted(theirs)
    same = lambda value: sorted(value) if isinstance(value, list) else value  # stock writes a set's order
    for key in ("target_modules", "target_parameters", "r", "lora_alpha", "peft_type", "base_model_name_or_path"):
        assert same(config.get(key)) == same(stock_config.get(key)), key
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-4
    if experts:
        ddp, _ = request.getfixturevalue("ddp_with_expert_lora")
        data_parallel, ddp_config = _adapter(ddp)
        assert ddp_config == config
        assert max((ours[k] - data_parallel[k]).abs().max().item() for k in ours) < 1e-6
        _resumes_exactly(tmp_path, model, target)


def _resumes_exactly(tmp: Path, model: Path, target: str) -> None:
    """A 2-rank FSDP2 run resumed from the checkpoint-2 of tmp/kt continues it exactly (accelerate's FSDP2
    checkpoint holds rank 0's LoRA shards only; kt-sft reloads the LoRA from the checkpoint's adapter)."""
    _train_fsdp(_config(tmp, "resumed", model, True, lora_target=target, save_steps=2, overwrite_output_dir=False,
                        resume_from_checkpoint=str(tmp / "kt" / "checkpoint-2")), True)
    full, resumed = _losses(tmp / "kt"), _losses(tmp / "resumed")
    assert [resumed[s] for s in (3, 4)] == [full[s] for s in (3, 4)]
