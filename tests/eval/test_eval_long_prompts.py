"""C-Eval prompts longer than the model's positions, as OpenCompass runs them (METHODS.md (a)): the GEN prompt is
left-truncated at max positions and generation continues past them. LLaMA's rotary embedding is a function of the
position, so PyTorch runs there as is; the fused ONNX graphs carry cos/sin tables of twice max positions. Runs on a
copy of the bundled model whose config says 256 positions, so the bundled C-Eval samples (200-290 tokens) overflow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from testkit import SHARED_DATA

from llmship.config import EMBEDDED_MODEL_DIR, SAMPLES_DIR, Config, ModelConfig
from llmship.errors import UserError

pytestmark = pytest.mark.skipif(not (EMBEDDED_MODEL_DIR / "config.json").is_file(), reason="embedded model not built")

POSITIONS = 256
LONG_SUBJECTS = ["metrology_engineer", "high_school_mathematics"]  # 5-shot GEN prompts of 269-288 tokens
SHARED_CEVAL = SHARED_DATA / "ceval"


def test_pytorch_rotary_continues_past_max_positions():
    import torch

    from llmship.source import load_source

    model = load_source(ModelConfig()).model
    max_positions = model.config.max_position_embeddings
    positions = torch.tensor([[0, max_positions - 1, max_positions, 2 * max_positions + 5]])
    cos, sin = model.model.rotary_emb(torch.zeros(1, 4, model.config.hidden_size), positions)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    inv_freq = 1.0 / (model.config.rope_parameters["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim))
    angles = positions.numpy()[0][:, None] * inv_freq[None, :]
    expected = np.concatenate([angles, angles], axis=-1)
    assert np.abs(cos[0].double().numpy() - np.cos(expected)).max() < 1e-4
    assert np.abs(sin[0].double().numpy() - np.sin(expected)).max() < 1e-4


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    """The bundled model said to have 256 positions, exported with both fused attention forms."""
    from llmship.export import export_fp32

    root = tmp_path_factory.mktemp("longprompts")
    model = root / "model"
    shutil.copytree(EMBEDDED_MODEL_DIR, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": POSITIONS}))
    cfg = Config.model_validate({
        "model": {"path": str(model)}, "output": {"dir": str(root / "out")},
        "eval": {"ceval": {"path": str(SAMPLES_DIR / "ceval"), "subjects": LONG_SUBJECTS, "max_questions": 3},
                 "perplexity": {"enabled": False}, "consistency_prompts": 0, "batch_size": 4, "baseline_cache": False},
    })
    folders = {}
    for attention in ("mha", "gqa"):
        exported = export_fp32(cfg.model_copy(update={"export": cfg.export.model_copy(update={"attention": attention})}),
                               root / "out" / attention)
        assert exported.manifest["optimize"]["applied"] and exported.manifest["parity"]["passed"]
        folders[attention] = exported.path
    return cfg, root, folders


def _old_table_copy(folder: Path, target: Path) -> Path:
    """The folder with cos/sin tables of exactly max positions, as graphs fused before the headroom."""
    import onnx
    from onnx import numpy_helper

    shutil.copytree(folder, target)
    proto = onnx.load(str(target / "model.onnx"))
    for init in proto.graph.initializer:
        if init.name.startswith(("rotary_cos_cache", "rotary_sin_cache")):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[:POSITIONS], init.name))
    onnx.save(proto, str(target / "model.onnx"))
    return target


@pytest.mark.slow
def test_gen_truncates_at_max_positions_and_generates_past_them_in_every_engine(short_model):
    from llmship.data.sources import read_ceval
    from llmship.eval import ceval
    from llmship.runtime import load_engine
    from llmship.source import load_tokenizer

    cfg, root, folders = short_model
    tokenizer = load_tokenizer(EMBEDDED_MODEL_DIR)
    cset = ceval.prepare(cfg.eval.ceval, read_ceval(cfg.eval.ceval.path), tokenizer, POSITIONS)
    prompts = [q.gen_ids for q in cset.questions if q.truncated][:3]
    if (SHARED_CEVAL / "val" / "logic_val.csv").is_file():  # real prompts of ~3000 tokens, when present
        real = ceval.prepare(cfg.eval.ceval.model_copy(update={"path": str(SHARED_CEVAL), "subjects": ["logic"],
                                                               "max_questions": 1}),
                             read_ceval(str(SHARED_CEVAL)), tokenizer, POSITIONS)
        prompts.append(real.questions[0].gen_ids)
    # OpenCompass: BOS + the last 255 tokens, no room kept for the new ones
    assert len(prompts) >= 3 and all(len(p) == POSITIONS and p[0] == 1 for p in prompts)
    prompts.append(prompts[0][-40:])  # a short row in the same left-padded batch
    engines = {"pytorch": load_engine(cfg.model), **{name: load_engine(path) for name, path in folders.items()}}
    assert engines["mha"].position_limit == engines["gqa"].position_limit == 2 * POSITIONS
    tokens = {name: engine.generate(prompts, 12, ignore_eos=True) for name, engine in engines.items()}
    assert all(len(row) == 12 for row in tokens["pytorch"])  # positions 256..266: past max positions
    assert tokens["mha"] == tokens["pytorch"] and tokens["gqa"] == tokens["pytorch"]
    # a graph whose table ends at max positions says so before running
    old = load_engine(_old_table_copy(folders["mha"], root / "old-engine"))
    assert old.position_limit == POSITIONS
    with pytest.raises(UserError, match="267 positions needed, the graph's rotary cos/sin table has 256"):
        old.generate(prompts, 12)


@pytest.mark.slow
def test_eval_gen_predictions_past_max_positions_equal_pytorch(short_model):
    from llmship.eval import run_eval

    cfg, root, folders = short_model
    result = run_eval(cfg, folders, root / "eval")
    stored = json.loads(Path(result["paths"]["results"]).read_text())
    records = {name: stored["engines"][name]["predictions"] for name in ("pytorch", "mha", "gqa")}
    gen = records["pytorch"]["gen"]
    assert len(gen) == 6 and sum(bool(r.get("truncated")) for r in gen) >= 3
    for name in ("mha", "gqa"):
        assert [r["output"] for r in records[name]["gen"]] == [r["output"] for r in gen]
        assert [r["pred"] for r in records[name]["ppl"]] == [r["pred"] for r in records["pytorch"]["ppl"]]
    assert any("left-truncated" in note for note in result["notes"])
    # a variant whose rotary table ends at max positions stops the eval before anything is scored
    old = _old_table_copy(folders["gqa"], root / "old-eval")
    with pytest.raises(UserError, match="C-Eval needs 263 positions") as err:
        run_eval(cfg, {"old": old}, root / "eval-old")
    assert str(old) in str(err.value) and not (root / "eval-old").exists()
