"""The LLaMA-Factory hook's argument handling, in process: our keys are accepted with their meaning, and bad keys or
contradictory combinations fail inside LLaMA-Factory's own `get_train_args` (so before any weight is read)."""
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from kt_sft.engine import FORMATS
from kt_sft.engine.formats import get_format
from kt_sft.llamafactory import config as ktc
from kt_sft.llamafactory.startup import activate
from llamafactory_run import llamafactory_cli

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "examples" / "demo" / "model"


@pytest.fixture(scope="module")
def get_train_args():
    activate()  # what the .pth does at interpreter start when USE_KT=1 (here LLaMA-Factory may be imported already)
    from llamafactory.hparams import get_train_args

    return get_train_args


def _args(tmp_path, **extra):
    base = dict(model_name_or_path=str(DEMO_MODEL), stage="sft", do_train=True, finetuning_type="lora",
                dataset="kt_demo", dataset_dir=str(REPO / "examples/demo/data"), template="qwen3_nothink",
                output_dir=str(tmp_path / "out"), report_to="none", use_kt=True)
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def test_keys_resolve_to_settings(get_train_args, tmp_path):
    model_args, *_ = get_train_args(_args(tmp_path, kt_backend="fp32", cpu_infer=2, chunk_size=512,
                                          kt_cpu_activation="recompute", kt_max_cache_depth=6,
                                          kt_optimize_rule="qwen3_moe", kt_gpu_experts=0.5))
    assert model_args.kt_sft_settings == ktc.KTSettings(rule="qwen3_moe", format=FORMATS["fp32"], threads=2,
                                                        chunk_size=512, retain_activations=False,
                                                        max_saved=6, gpu_experts=0.5)
    assert model_args.kt_sft_settings.family.model_type == "qwen3_moe"  # resolved once, for the loader
    model_args, *_ = get_train_args(_args(tmp_path))
    assert model_args.kt_sft_settings == ktc.KTSettings()  # every default is "auto"
    assert model_args.kt_sft_settings.gpu_experts == "auto"
    for given, parsed in (("auto", "auto"), ("AUTO", "auto"), (0, 0.0), ("0.7", 0.7), (1, 1.0)):
        model_args, *_ = get_train_args(_args(tmp_path, kt_gpu_experts=given))
        assert ktc.load_fields(model_args.kt_sft_settings)["gpu_experts"] == parsed, given
    model_args, *_ = get_train_args(_args(tmp_path, kt_num_threads="1", cpu_infer=1))  # an alias may repeat it
    assert model_args.kt_sft_settings.threads == 1
    model_args, *_ = get_train_args(_args(tmp_path, kt_backend="AMXINT8"))
    assert model_args.kt_sft_settings.format is FORMATS["int8-gemm"]
    model_args, *_ = get_train_args(_args(tmp_path, kt_backend="int8"))
    assert model_args.kt_sft_settings.format is FORMATS["int8"]
    model_args, *_ = get_train_args(_args(tmp_path, kt_backend="AMXINT4", kt_int4_group_size="24"))
    assert ktc.load_fields(model_args.kt_sft_settings)["int4_group"] == 24  # LoadOptions.int4_group


def test_kt_numa_reaches_load_options(get_train_args, tmp_path):
    """kt_numa as a YAML gives it (`off` reads as false in YAML 1.1, as LLaMA-Factory's OmegaConf loads it) becomes
    LoadOptions.numa; unset leaves KT_SFT_NUMA / auto to the engine."""
    from omegaconf import OmegaConf

    from kt_sft.load_options import LoadOptions

    for text, want in (("kt_numa: 2", 2), ("kt_numa: off", "off"), ("kt_numa: auto", "auto"), ("kt_numa: '3'", 3)):
        value = OmegaConf.to_container(OmegaConf.create(text))["kt_numa"]
        model_args, *_ = get_train_args(_args(tmp_path, kt_numa=value))
        assert model_args.kt_sft_settings.numa == want, text
        assert LoadOptions(**ktc.load_fields(model_args.kt_sft_settings)).numa == want
    model_args, *_ = get_train_args(_args(tmp_path))
    assert model_args.kt_sft_settings.numa is None


def test_argv_form_is_split_too():
    rest, ours = ktc.split_kt_keys(["--use_kt", "true", "--kt_backend", "FP32", "--chunk_size=64", "--lr", "1"])
    assert rest == ["--use_kt", "true", "--lr", "1"]
    assert ours == {"kt_backend": "FP32", "chunk_size": "64"}


def _zero3_config(tmp_path) -> str:
    path = tmp_path / "ds_z3.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": "auto",
                                "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}))
    return str(path)


BAD = [
    ({"kt_bogus": 1}, "unknown kt-sft key(s) kt_bogus"),
    ({"finetuning_type": "full"}, "finetuning_type='full'"),
    ({"finetuning_type": "freeze"}, "trains LoRA adapters only"),
    ({"stage": "rm"}, "supported stages are sft, pt, dpo, kto"),
    ({"stage": "dpo", "finetuning_type": "full"}, "reference model is the same model with the adapter disabled"),
    ({"stage": "dpo", "ref_model": "/some/other/model"}, "ref_model='/some/other/model': with use_kt the reference"),
    ({"stage": "kto", "ref_model": str(DEMO_MODEL), "ref_model_adapters": "/an/adapter"},
     "ref_model_adapters='/an/adapter': with use_kt the reference model is model_name_or_path with the LoRA"),
    ({"stage": "dpo", "ref_model_quantization_bit": 4}, "ref_model_quantization_bit=4: with use_kt"),
    ({"kt_backend": "Q4"}, "'Q4' is not one of"),
    ({"cpu_infer": 2, "kt_num_threads": 3}, "kt_num_threads=3 and cpu_infer=2 disagree"),
    ({"kt_num_threads": -1}, "kt_num_threads: expected an integer >= 0"),
    ({"cpu_infer": "--2"}, "cpu_infer: expected an integer >= 0, got '--2'"),
    ({"kt_max_cache_depth": 0}, "kt_max_cache_depth: expected an integer >= 1, got 0"),
    ({"chunk_size": "many"}, "chunk_size: expected an integer"),
    ({"kt_cpu_activation": "offload"}, "retain or recompute"),
    ({"kt_int4_group_size": 0}, "kt_int4_group_size: expected an integer >= 1, got 0"),
    ({"kt_int4_group_size": 2.5}, "kt_int4_group_size: expected an integer >= 1, got 2.5"),
    ({"kt_numa": "abc"}, "kt_numa: expected auto (the host's nodes), off, or a number of nodes from 1 to 64"),
    *(({"kt_numa": n}, f"kt_numa: expected auto (the host's nodes), off, or a number of nodes from 1 to 64 (N > 1 on "
                       f"a one-node host: N virtual nodes, for testing), got {n}") for n in (0, -1)),
    ({"kt_numa": True}, "kt_numa: expected auto"),
    ({"kt_gpu_experts": 1.5}, "kt_gpu_experts: expected auto or a fraction between 0 and 1, got 1.5"),
    ({"kt_gpu_experts": "all"}, "kt_gpu_experts: expected auto or a fraction between 0 and 1, got 'all'"),
    ({"kt_gpu_experts": True}, "kt_gpu_experts: expected auto or a fraction between 0 and 1, got True"),
    ({"use_kt": False, "kt_backend": "AMXBF16"}, "use_kt is false"),
    ({"kt_maxlen": 4096}, "use LLaMA-Factory's cutoff_len"),
    ({"kt_weight_path": "/some/where"}, "pre-quantized .kt expert files are not supported"),
    ({"kt_use_lora_experts": True}, "GPU-side LoRA experts are not supported"),
    ({"kt_lora_expert_num": 4}, "kt_lora_expert_num=4: belongs to kt_use_lora_experts"),
    ({"kt_expert_checkpoint_path": "/no/such/dir"}, "is not a directory"),
    ({"quantization_bit": 4}, "quantization_bit"),
    ({"use_unsloth": True}, "use_unsloth with use_kt"),
    ({"model_name_or_path": "Qwen/Qwen3-30B-A3B"}, "does not download models"),
    ({"kt_optimize_rule": "mixtral"}, "built-in family for model_type 'mixtral'"),
    ({"kt_optimize_rule": "no_such_family"}, "rule 'no_such_family': no such rule file"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m.split()[0].strip("'=:") for _, m in BAD])
def test_bad_config_fails_before_loading(get_train_args, tmp_path, extra, message):
    with pytest.raises(ktc.KTConfigError, match=None) as err:
        get_train_args(_args(tmp_path, **extra))
    assert message in str(err.value)


@pytest.mark.parametrize("stage,extra", [("dpo", {"pref_loss": loss}) for loss in
                                         ("sigmoid", "ipo", "hinge", "orpo", "simpo")] + [("kto", {})])
def test_preference_stages_are_accepted(get_train_args, tmp_path, stage, extra):
    """DPO / KTO with LoRA; a ref_model naming the base checkpoint (here by another spelling) is accepted: it is the
    policy with its adapter disabled, which the workflow reuses (patches.patch_preference_workflow)."""
    dataset = {"dpo": "kt_demo_pref", "kto": "kt_demo_kto"}[stage]
    model_args, _, _, finetuning_args, _ = get_train_args(_args(tmp_path, stage=stage, dataset=dataset, **extra))
    assert model_args.kt_sft_settings is not None and finetuning_args.stage == stage
    get_train_args(_args(tmp_path, stage=stage, dataset=dataset, ref_model=str(DEMO_MODEL) + "/.", **extra))


def test_preference_workflows_reuse_the_policy_as_reference():
    from llamafactory.train.dpo import workflow as dpo_workflow
    from llamafactory.train.kto import workflow as kto_workflow

    activate()
    model_args, finetuning_args = SimpleNamespace(use_kt=True), SimpleNamespace(ref_model=str(DEMO_MODEL))
    for workflow in (dpo_workflow, kto_workflow):
        assert workflow.create_ref_model(model_args, finetuning_args) is None  # never a second load


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed here")
def test_infer_backend_other_than_huggingface_is_refused(tmp_path):
    activate()
    from llamafactory.hparams import get_infer_args

    args = dict(model_name_or_path=str(DEMO_MODEL), template="qwen3_nothink", use_kt=True)
    model_args, *_ = get_infer_args(args)
    assert model_args.kt_sft_settings == ktc.KTSettings()
    with pytest.raises(ktc.KTConfigError, match="infer_backend='vllm' with use_kt"):
        get_infer_args({**args, "infer_backend": "vllm"})


def test_zero3_is_refused(get_train_args, tmp_path):
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    try:
        with pytest.raises(ktc.KTConfigError, match="ZeRO-3"):
            get_train_args(_args(tmp_path, deepspeed=_zero3_config(tmp_path)))
    finally:
        unset_hf_deepspeed_config()  # process-global in transformers; later tests must not see ZeRO-3


def test_fsdp2_is_accepted_fsdp1_and_offload_are_refused_and_several_processes_are_data_parallel(monkeypatch):
    from kt_sft import distributed

    monkeypatch.setattr(distributed, "_timeout", distributed._timeout)  # restored after the test
    monkeypatch.setattr(distributed, "_fsdp", False)
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_OFFLOAD_PARAMS"):
        monkeypatch.delenv(name, raising=False)
    training = SimpleNamespace(deepspeed=None, fsdp="full_shard auto_wrap", fsdp_config={"version": 2}, world_size=2,
                               n_gpu=1, ddp_timeout=77)
    ktc._check_training(training)  # the Trainer's own fsdp keys, version 2
    assert distributed.fsdp()
    with pytest.raises(ktc.KTConfigError, match="FSDP version 1 with use_kt: .* fsdp_version: 2"):
        ktc._check_training(SimpleNamespace(**{**vars(training), "fsdp_config": {}}))
    with pytest.raises(ktc.KTConfigError, match="fsdp_offload_params.*set fsdp_offload_params: false"):
        ktc._check_training(SimpleNamespace(**{**vars(training), "fsdp": "full_shard offload"}))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # `accelerate launch` with an FSDP config file
    with pytest.raises(ktc.KTConfigError, match="FSDP version 1"):  # accelerate's default version
        ktc._check_training(SimpleNamespace(**{**vars(training), "fsdp": ""}))
    monkeypatch.setenv("FSDP_VERSION", "2")
    ktc._check_training(SimpleNamespace(**{**vars(training), "fsdp": ""}))
    assert distributed.fsdp()
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ktc.KTConfigError, match="fsdp_offload_params"):
        ktc._check_training(SimpleNamespace(**{**vars(training), "fsdp": ""}))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    ktc._check_training(SimpleNamespace(**{**vars(training), "fsdp": ""}))  # torchrun ranks: data parallel
    assert not distributed.fsdp()
    assert distributed._timeout.total_seconds() == 77  # kt-sft's collectives take the run's ddp_timeout
    with pytest.raises(ktc.KTConfigError, match="2 GPUs are visible"):
        ktc._check_training(SimpleNamespace(**{**vars(training), "fsdp": "", "n_gpu": 2}))


def test_upstream_injection_rule_gets_a_pointer(get_train_args, tmp_path):
    rule = tmp_path / "DeepSeek-V2-Lite-Chat-sft-amx.yaml"
    rule.write_text("- match:\n    name: '^model\\.layers\\..*\\.mlp\\.experts$'\n  replace:\n    class: x\n")
    with pytest.raises(ktc.KTConfigError, match="KTransformers injection rule"):
        get_train_args(_args(tmp_path, kt_optimize_rule=str(rule)))


def test_unsupported_model_type_lists_supported(get_train_args, tmp_path):
    model = tmp_path / "dense"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ktc.KTConfigError, match=r"'llama' is not supported by kt-sft \(supported: .*qwen3_moe"):
        get_train_args(_args(tmp_path, model_name_or_path=str(model)))


def test_families_derive_without_a_rule_and_refusals_name_what_is_missing(get_train_args, tmp_path, tiny_checkpoint):
    """A family with no rule file anywhere (olmoe) passes the checks with its derived rule; one kt-sft refuses
    (qwen3_omni_moe: an omni model, audio / speech out) fails there, before anything loads, naming what is missing."""
    from tiny_models import refused_config

    model_args, *_ = get_train_args(_args(tmp_path, model_name_or_path=str(tiny_checkpoint("olmoe"))))
    family = model_args.kt_sft_settings.family
    assert (family.model_type, family.source) == ("olmoe", "derived from OlmoeForCausalLM")
    refused_config("qwen3_omni_moe").save_pretrained(tmp_path / "qwen3_omni_moe")
    with pytest.raises(ktc.KTConfigError, match=r"qwen3_omni_moe: omni \(audio / speech\) model .* not supported yet"):
        get_train_args(_args(tmp_path, model_name_or_path=str(tmp_path / "qwen3_omni_moe")))


def test_hook_file_is_installed_and_only_active_with_use_kt():
    pth = Path(sysconfig.get_paths()["purelib"]) / "kt_sft-llamafactory-hook.pth"
    assert pth.is_file(), "pip install -e . should have placed the hook .pth in site-packages"
    probe = "import sys; print(any(type(f).__name__ == '_PostImportFinder' for f in sys.meta_path))"
    for value, active in (("1", "True"), ("true", "True"), ("0", "False"), ("", "False")):
        env = {**os.environ, "USE_KT": value}
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == active, (value, out.stdout, out.stderr)


@pytest.mark.slow
def test_hook_is_active_in_torchrun_children(tmp_path):
    probe = tmp_path / "probe.py"
    # Each rank writes its own file: two ranks printing to one pipe may interleave their lines.
    probe.write_text("import os, sys\nactive = any(type(f).__name__ == '_PostImportFinder' for f in sys.meta_path)\n"
                     f"open(os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK']), 'w').write(str(active))\n")
    env = {**os.environ, "USE_KT": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
                          str(probe)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert {r: (tmp_path / f"rank{r}").read_text() for r in (0, 1)} == {0: "True", 1: "True"}


@pytest.mark.slow
def test_cli_error_reaches_the_user(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in _args(tmp_path, kt_backend="Q4").items()))
    out = subprocess.run(llamafactory_cli("train", str(cfg)), env={**os.environ, "USE_KT": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0
    assert "kt_backend: 'Q4' is not one of AMXBF16, BF16, FP32, INT8, AMXINT8" in out.stderr
    assert not (tmp_path / "out").exists()  # nothing written


EXAMPLE_FAMILIES = {"qwen3_30b_a3b_lora_sft_kt": "qwen3_moe", "deepseek_v2_lite_lora_sft_kt": "deepseek_v2",
                    "deepseek_v3_lora_sft_kt": "deepseek_v3", "mixtral_8x7b_lora_sft_kt": "mixtral",
                    "glm4_5_air_lora_sft_kt": "glm4_moe", "demo_lora_sft_kt": "qwen3_moe",
                    "demo_lora_dpo_kt": "qwen3_moe"}


def test_every_example_config_is_checked():
    assert {p.stem for p in (REPO / "examples" / "train_lora").glob("*.yaml")} == set(EXAMPLE_FAMILIES)


@pytest.mark.parametrize("name", sorted(EXAMPLE_FAMILIES))
def test_example_configs_parse(get_train_args, tmp_path, name):
    """Every shipped example parses with the hook (its checkpoint path swapped for a stand-in of its family)."""
    import yaml

    path = REPO / "examples" / "train_lora" / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("# ") and f"USE_KT=1 llamafactory-cli train examples/train_lora/{path.name}" in text
    assert "RAM" in text and "GPU" in text  # says what memory it needs
    cfg = yaml.safe_load(text)
    stand_in = tmp_path / "model"
    stand_in.mkdir()
    (stand_in / "config.json").write_text(json.dumps({"model_type": EXAMPLE_FAMILIES[name]}))
    save_file({"stand_in": torch.zeros(1)}, stand_in / "model.safetensors")  # the hook reads the shards' headers
    cfg.update(model_name_or_path=str(stand_in), output_dir=str(tmp_path / "out"), bf16=False)
    model_args, _, _, finetuning_args, _ = get_train_args(cfg)
    assert model_args.use_kt and model_args.kt_sft_settings.format is get_format(cfg["kt_backend"])
    assert finetuning_args.finetuning_type == "lora"


def test_readme_key_table_is_generated():
    readme = (REPO / "README.md").read_text()
    assert ktc.readme_key_table(readme) == ktc.readme_table(), (
        "README.md's 'Config keys' table differs from KEY_SPECS in kt_sft/llamafactory/config.py; regenerate it "
        "with `python -m kt_sft.llamafactory.config README.md`")


def test_key_specs_drive_split_errors_and_help():
    """Which keys the hook takes from LLaMA-Factory's arguments, the accepted-keys list and kt_backend's help all
    come from KEY_SPECS (and kt_backend's from the format table)."""
    for spec in ktc.KEY_SPECS:
        for name in spec.names:
            rest, ours = ktc.split_kt_keys({name: 1, "lr": 1})
            assert (name in ours) == (spec.source != ktc.LLAMAFACTORY) and (name in rest) != (name in ours), name
    with pytest.raises(ktc.KTConfigError, match="accepted keys: ") as err:
        ktc.resolve({"kt_bogus": 1}, SimpleNamespace(use_kt=True))
    accepted = str(err.value).split("accepted keys: ")[1].split(" (")[0].split(", ")
    assert accepted == sorted(n for spec in ktc.KEY_SPECS if spec.source != ktc.RETIRED for n in spec.names)
    backend = next(spec for spec in ktc.KEY_SPECS if spec.name == "kt_backend")
    for fmt in FORMATS.values():
        assert all(name in backend.help for name in fmt.backends) and fmt.doc in backend.help


def test_lora_target_split_for_engine_models():
    """`all` expands to LLaMA-Factory's linear list; expert names become target_parameters; a wrong expert
    parameter name is refused with this model's expert parameter names."""
    import torch

    import kt_sft
    from kt_sft.llamafactory.patches import split_lora_targets
    from kt_sft.models.expert_lora import resolve_expert_targets

    model = kt_sft.load_model(DEMO_MODEL, device="cpu", dtype=torch.float32, progress=False)
    assert split_lora_targets(model, ["all", "experts"]) == (["k_proj", "o_proj", "q_proj", "v_proj"], ["experts"])
    assert split_lora_targets(model, ["q_proj", "mlp.experts.down_proj"]) == (["q_proj"], ["mlp.experts.down_proj"])
    assert resolve_expert_targets(model, ["experts"]) == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    with pytest.raises(ValueError, match=r"'mlp.experts.w13' matches no routed-expert parameter of this model; "
                                         r"its expert parameters are model.layers.0.mlp.experts.gate_up_proj"):
        resolve_expert_targets(model, *split_lora_targets(model, ["all", "mlp.experts.w13"])[1:])


@pytest.fixture(scope="module")
def dsv2_with_dense_mlps(tmp_path_factory):
    """A tiny deepseek_v2 on the engine: a dense first layer and shared experts, whose MLP linears are named
    gate_proj / up_proj / down_proj like the routed experts' projections."""
    import torch

    import kt_sft
    from tiny_models import make_tiny_checkpoint

    path = tmp_path_factory.mktemp("dsv2")
    make_tiny_checkpoint("deepseek_v2", path)
    return path, kt_sft.load_model(path, device="cpu", dtype=torch.float32, progress=False)


def test_lora_target_names_keep_stock_meaning_where_modules_match(dsv2_with_dense_mlps):
    """`lora_target: all` (LLaMA-Factory expands it before get_peft_model) and dotted dense / shared-expert names
    target modules exactly as stock PEFT would; only `experts`, the experts module path and parameter names that
    no module has name the routed experts."""
    from llamafactory.model.model_utils.misc import find_all_linear_modules

    from kt_sft.llamafactory.patches import split_lora_targets
    from kt_sft.models.expert_lora import resolve_expert_targets

    _, model = dsv2_with_dense_mlps
    expanded = find_all_linear_modules(model, freeze_vision_tower=True)
    assert "down_proj" in expanded
    assert split_lora_targets(model, expanded) == (sorted(expanded), [])
    for dense in ("shared_experts.down_proj", "mlp.down_proj", "down_proj"):
        assert split_lora_targets(model, ["q_proj", dense]) == (sorted(["q_proj", dense]), [])
    modules, experts = split_lora_targets(model, ["all", "experts"])
    assert "down_proj" in modules and experts == ["experts"]
    for name in ("mlp.experts", "mlp.experts.down_proj", "experts.gate_up_proj"):
        assert split_lora_targets(model, ["q_proj", name]) == (["q_proj"], [name])
    assert resolve_expert_targets(model, ["mlp.experts"]) == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def test_lora_all_wraps_the_same_modules_as_stock(dsv2_with_dense_mlps):
    """Through the hook's get_peft_model, LLaMA-Factory's expansion of `all` puts LoRA on exactly the modules stock
    PEFT wraps on the stock model (routed experts frozen), and a routed-expert target with lora_dropout > 0 is
    refused naming lora_dropout (PEFT has no dropout for target_parameters)."""
    import types

    import peft
    import torch
    from llamafactory.model.model_utils.misc import find_all_linear_modules
    from transformers import AutoModelForCausalLM

    from kt_sft.llamafactory.patches import patch_adapter

    path, model = dsv2_with_dense_mlps
    from llamafactory.model.model_utils.visual import patch_target_modules

    adapter = types.SimpleNamespace(get_peft_model=peft.get_peft_model, PeftModel=peft.PeftModel,
                                    patch_target_modules=patch_target_modules)
    patch_adapter(adapter)
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    def lora_names(m, targets, dropout=0.0):
        cfg = peft.LoraConfig(r=2, target_modules=list(targets), lora_dropout=dropout)
        wrapped = (adapter.get_peft_model if m is model else peft.get_peft_model)(m, cfg)
        return sorted(n for n, _ in wrapped.named_parameters() if "lora_" in n)

    with pytest.raises(ValueError, match=r"lora_dropout=0.05: LoRA on the routed experts \(lora_target experts\)"):
        lora_names(model, ["q_proj", "experts"], dropout=0.05)
    ours = lora_names(model, find_all_linear_modules(model, freeze_vision_tower=True), dropout=0.05)
    want = lora_names(stock, find_all_linear_modules(stock, freeze_vision_tower=True), dropout=0.05)
    assert ours == want and any("shared_experts.down_proj" in n for n in ours)


def test_every_setting_is_a_load_option(get_train_args, tmp_path):
    """The settings reach load_model by name: each KeySpec.setting is a LoadOptions field (no second mapping)."""
    import dataclasses

    from kt_sft.load_options import LoadOptions

    options = {f.name for f in dataclasses.fields(LoadOptions)}
    assert {s.setting for s in ktc.KEY_SPECS if s.setting and s.use == ktc.LOAD} <= options
    model_args, *_ = get_train_args(_args(tmp_path, kt_check_memory=False, kt_max_cache_depth=3))
    fields = ktc.load_fields(model_args.kt_sft_settings)
    assert fields["check_memory"] is False and fields["max_saved"] == 3
    assert LoadOptions(**fields).check_memory is False
