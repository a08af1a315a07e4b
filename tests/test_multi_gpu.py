"""Past one device, on two CPU processes (gloo): tensor parallelism through transformers (`tp_plan="auto"` under
torchrun), a device_map that offloads layers, and training with FSDP2 (accelerate launch --config_file train/fsdp.yaml)
and DDP (train/ddp.yaml), each against one process.

accelerate runs FSDP only with GPUs: the FSDP test launches train/fsdp.yaml as it is, with a one-line shim that makes
accelerate take gloo on CPU for its GPU backend (`ACCELERATE_TORCH_DEVICE=cpu`), so its FSDP2 code runs unchanged.
DDP on CPU is accelerate's MULTI_CPU (`ACCELERATE_USE_CPU=1`). Two CPU processes take a few seconds to start: four
launches, about 45 s in all.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ONE_THREAD, REPO
from r2lm import R2LMConfig, R2LMForDiffusionLM
from train.__main__ import main
from train.tokenizer import train_tokenizer


TINY = [
    "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--num-kv-heads", "1", "--head-dim", "16",
    "--intermediate-size", "64", "--sidecar-layers", "1", "--block-size", "8", "--max-position-embeddings", "64",
    "--seq-len", "32", "--eval-rows", "8", "--warmup-steps", "2", "--log-every", "1", "--heldout-fraction", "0.25",
    "--eval-every", "100", "--save-every", "100", "--lr", "1e-2",
]
# accelerate's FSDP path asks for a GPU backend; on CPU, gloo stands in for it (ACCELERATE_TORCH_DEVICE=cpu).
FSDP_ON_CPU = """
import sys
from accelerate.state import PartialState
from accelerate.utils import DistributedType
PartialState._prepare_backend = lambda self, *args, **kwargs: ("gloo", DistributedType.MULTI_GPU)
from train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command, cwd, **env):
    """Runs a launcher command (two processes) offline, one thread each; fails the test with its output otherwise."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **ONE_THREAD, **env}
    done = subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
            *map(str, args)]


def losses(run):
    return [r["loss"] for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(corpus folder, tokenizer folder): twelve small Python files and a 300-token BPE trained on them."""
    root = tmp_path_factory.mktemp("multi")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"mod{i:02d}.py").write_text("".join(f"def marker{i:02d}_{j}(x):\n    return x * {j} + {i}\n\n"
                                                       for j in range(40)))
    train_tokenizer(sorted(corpus.glob("*.py")), vocab_size=300).save_pretrained(root / "tokenizer")
    return corpus, root / "tokenizer"


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    """Four steps on one process with --batch-size 4: the run that two processes of --batch-size 2 must repeat."""
    corpus, tokenizer = data
    out = tmp_path_factory.mktemp("one") / "run"
    assert main(["--data", str(corpus), "--tokenizer", str(tokenizer), "--output-dir", str(out), *TINY,
                 "--batch-size", "4", "--max-steps", "4"]) == 0
    return out


def test_fsdp2_two_processes_repeat_one_and_resume_exactly(data, one_process, tmp_path, capsys):
    """train/fsdp.yaml (FSDP2, each decoder layer a shard unit) on two processes of --batch-size 2: the same losses as
    one process of 4 (float32 on CPU: equal up to the order of the reductions, 1e-5), also after stopping at step 2
    and resuming from the sharded checkpoint; the final folder loads on one process with the one-process weights;
    resuming it on one process is refused, naming the world size."""
    corpus, tokenizer = data
    (tmp_path / "fsdp_on_cpu.py").write_text(FSDP_ON_CPU)
    out = tmp_path / "run"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", REPO / "train" / "fsdp.yaml",
                  "--main_process_port", free_port(), tmp_path / "fsdp_on_cpu.py"]
    argv = ["--data", corpus, "--tokenizer", tokenizer, "--output-dir", out, *TINY, "--batch-size", "2",
            "--max-steps", "4", "--stop-after-steps", "2"]
    launch([str(a) for a in accelerate + argv], tmp_path, ACCELERATE_TORCH_DEVICE="cpu")
    assert (out / "checkpoint-0000002" / "training_state" / "pytorch_model_fsdp_0").is_dir()  # sharded
    launch([str(a) for a in accelerate + ["--resume", out]], tmp_path, ACCELERATE_TORCH_DEVICE="cpu")
    assert losses(out) == pytest.approx(losses(one_process), rel=1e-5) and len(losses(out)) == 4

    final = R2LMForDiffusionLM.from_pretrained(out / "final")
    reference = R2LMForDiffusionLM.from_pretrained(one_process / "final").state_dict()
    for name, tensor in final.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-5, msg=name)
    assert final.model.layers[1].sidecar.gate.shape == () and final.model.layers[1].sidecar.gate != 0

    assert main(["--resume", str(out)]) == 2
    assert "written by 2 processes (world size 2) and this run has 1" in capsys.readouterr().err


def test_ddp_two_processes_repeat_one(data, one_process, tmp_path):
    """`accelerate launch --config_file train/ddp.yaml -m train` (on CPU, ACCELERATE_USE_CPU=1 makes it accelerate's
    MULTI_CPU DDP) on two processes of --batch-size 2: the losses of one process of 4."""
    corpus, tokenizer = data
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", REPO / "train" / "ddp.yaml",
               "--main_process_port", free_port(), "-m", "train", "--data", corpus, "--tokenizer", tokenizer,
               "--output-dir", out, *TINY, "--batch-size", "2", "--max-steps", "4", "--stop-after-steps", "2"]
    launch([str(c) for c in command], REPO, ACCELERATE_USE_CPU="1")
    assert losses(out) == pytest.approx(losses(one_process)[:2], rel=1e-5) and len(losses(out)) == 2


TP_WORKER = """
import json, sys, warnings
import torch, torch.distributed as dist
from transformers import AutoModelForCausalLM

warnings.simplefilter("ignore", FutureWarning)  # transformers >= 5.18 prefers distributed_config=DistributedConfig(...)
good, bad, out = sys.argv[1:4]
result = {}
try:
    AutoModelForCausalLM.from_pretrained(bad, trust_remote_code=True, dtype=torch.float32, tp_plan="auto")
except ValueError as err:
    result["bad"] = str(err)
model = AutoModelForCausalLM.from_pretrained(good, trust_remote_code=True, dtype=torch.float32, tp_plan="auto")
weight = model.model.layers[0].self_attn.q_proj.weight
result["q_proj"] = list((weight.to_local() if hasattr(weight, "to_local") else weight).shape)
ids = torch.tensor(json.loads(sys.argv[4]))
result["tokens"] = model.generate(ids, max_new_tokens=16, threshold=0.7).tolist()
try:
    model.generate(ids, max_new_tokens=16, cache_implementation="static")
except ValueError as err:
    result["static"] = str(err)
if dist.get_rank() == 0:
    open(out, "w").write(json.dumps(result))
"""


def tiny_r2lm(folder, heads, kv_heads):
    """A tiny random R2LM (hidden 32, 4 layers, a sidecar after layer 3 with a nonzero gate) saved in `folder`."""
    config = R2LMConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, head_dim=8,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                        block_size=8, mask_token_id=127, eos_token_id=0, pad_token_id=0, initializer_range=0.2)
    torch.manual_seed(0)
    model = R2LMForDiffusionLM(config)
    with torch.no_grad():
        model.model.layers[3].sidecar.gate.fill_(0.5)  # the sidecar changes the tokens
    model.save_pretrained(folder)
    return model


def test_tensor_parallel_generate_matches_one_process(tmp_path):
    """from_pretrained(tp_plan="auto") under torchrun on two processes (float32): attention and MLP are split (each rank
    holds half the query rows), generate gives the tokens of one process, the engine asked for explicitly is refused
    with one clear line, and a head count that two ranks cannot split is refused when loading."""
    model = tiny_r2lm(tmp_path / "good", heads=4, kv_heads=2)
    tiny_r2lm(tmp_path / "bad", heads=3, kv_heads=1)
    ids = torch.randint(1, 120, (2, 11), generator=torch.Generator().manual_seed(0))
    (tmp_path / "worker.py").write_text(TP_WORKER)
    launch(torchrun(tmp_path / "worker.py", tmp_path / "good", tmp_path / "bad", tmp_path / "out.json",
                    json.dumps(ids.tolist())), tmp_path, HF_HOME=str(tmp_path / "hf_home"))
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["q_proj"] == [16, 32]  # 4 heads of 8 over 2 ranks
    assert result["tokens"] == model.generate(ids, max_new_tokens=16, threshold=0.7).tolist()
    assert "cache_implementation='static'" in result["static"] and "sharded over processes (tp_plan" in result["static"]
    assert result["bad"].startswith("tp_plan: num_attention_heads (3) and num_key_value_heads (1) must be multiples "
                                    "of the tensor-parallel size (2)")


def test_offloaded_layers_generate_alike_and_refuse_the_engine(tmp_path):
    """A device_map that offloads layers (to cpu and disk: accelerate's hooks load them at each forward, the sidecars'
    directly read weights too) generates the tokens of the whole model; asking for the engine is a clear error."""
    model = tiny_r2lm(tmp_path / "model", heads=4, kv_heads=2)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "cpu", "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu",
                  "lm_head": "cpu"}
    offloaded = R2LMForDiffusionLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                                   offload_folder=tmp_path / "offload")
    assert offloaded.model.layers[3].sidecar.mamba.conv1d.weight.device.type == "meta"
    ids = torch.randint(1, 120, (2, 11), generator=torch.Generator().manual_seed(1))
    assert torch.equal(offloaded.generate(ids, max_new_tokens=16, threshold=0.7),
                       model.generate(ids, max_new_tokens=16, threshold=0.7))
    with pytest.raises(ValueError, match=r"cache_implementation='static' .* \(device_map puts model.embed_tokens"):
        offloaded.generate(ids, max_new_tokens=16, cache_implementation="static")


def test_device_map_that_splits_the_tied_embedding_is_a_clear_error(tmp_path):
    """The embedding and lm_head share one weight: a device_map that puts them apart breaks the tie (accelerate then
    fails deep inside with a KeyError); forward and generate refuse it with one line naming both modules."""
    tiny_r2lm(tmp_path / "model", heads=4, kv_heads=2)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "cpu", "model.norm": "cpu",
                  "lm_head": "disk"}
    split = R2LMForDiffusionLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                               offload_folder=tmp_path / "offload")
    ids = torch.randint(1, 120, (2, 11), generator=torch.Generator().manual_seed(3))
    message = r"device_map puts model.embed_tokens on cpu and lm_head on disk, but they share one weight"
    with pytest.raises(ValueError, match=message):
        split.generate(ids, max_new_tokens=8)
    with pytest.raises(ValueError, match=message):
        split(ids)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_device_map_over_two_gpus_generates_alike(tmp_path):
    """device_map="auto" with max_memory forcing a split over two GPUs: the tokens of one GPU (float32, both through
    the eager runner: the engine keeps a model on one device)."""
    tiny_r2lm(tmp_path / "model", heads=4, kv_heads=2)
    one = R2LMForDiffusionLM.from_pretrained(tmp_path / "model", device_map={"": 0})
    split = R2LMForDiffusionLM.from_pretrained(tmp_path / "model", device_map="auto",
                                               max_memory={0: "200KB", 1: "10GB"})  # layers 0-1 | 2-3
    assert len({p.device for p in split.parameters()}) == 2
    ids = torch.randint(1, 120, (2, 11), generator=torch.Generator().manual_seed(2)).cuda()
    kw = dict(max_new_tokens=16, threshold=0.7, cache_implementation="dynamic")
    assert torch.equal(split.generate(ids, **kw).cpu(), one.generate(ids, **kw).cpu())
