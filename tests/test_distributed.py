"""fastpeft layers as plain citizens of torch.distributed: DDP and FSDP2 (``fully_shard``) with 2 CPU processes
(gloo) train a patched tiny LLaMA to the same losses and adapter weights as one process on the whole batch, and the
adapter saved from rank 0 is in PEFT's format.

Why the runs are comparable: every rank builds the model from the same seed, takes its own half of a fixed batch of
equal-length rows, and the LLaMA loss is a mean over tokens; with equal token counts per rank, the mean of the rank
means is the full-batch mean, and both DDP's all-reduce and FSDP2's reduce-scatter average gradients over ranks. So
the distributed gradient is the single-process gradient up to float summation order (hence a 1e-5 tolerance, not
bit equality). ``lora_dropout=0``: with dropout the mask depends on each rank's seed (drawn from its own torch RNG)
and on the row index inside its local batch, so rank r's rows would not get the mask the same rows get in a
single-process run; that comparison would not be well defined (see docs/distributed.md).

The workers are this file run as a script (torchrun-style: RANK/WORLD_SIZE/MASTER_* in the environment), so they
import nothing from pytest. DDP and FSDP2 run in the same two processes to pay the import cost once.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

STEPS = 3
BATCH, SEQ = 4, 12
VOCAB = 97


def build_model():
    """A patched tiny LLaMA, identical on every rank (same seed); lora_B made non-zero so step 1 moves lora_A too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import fastpeft

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = fastpeft.patch(LlamaForCausalLM(config), r=4, lora_alpha=8, lora_dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def adapter_weights(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 parameters are sharded DTensors
            out[name.replace("module.", "", 1) if name.startswith("module.") else name] = t.detach().clone()
    return out


def train(model, rows: slice, reduce_loss=None) -> list[float]:
    """SGD with momentum on this process's rows; returns the full-batch loss per step."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    losses = []
    for ids in batches():
        ids = ids[rows]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(reduce_loss(loss.detach()) if reduce_loss else loss.item())
    return losses


def single_process() -> tuple[list[float], dict[str, torch.Tensor]]:
    model = build_model()
    losses = train(model, slice(None))
    return losses, adapter_weights(model)


def _worker(out_dir: str) -> None:
    """One rank: DDP run, then FSDP2 run, each saving losses, full adapter weights and a PEFT adapter (rank 0)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fastpeft.functional as functional

    torch.set_num_threads(1)
    # Count fused calls, by the full path or a settled training call: a layer that fell back to PEFT's forward
    # (e.g. on a sharded weight) would pass silently.
    fused_calls = [0]
    original, original_settled = functional.lora_linear, functional.SettledTrainingCall.output

    def counting(*args, **kwargs):
        fused_calls[0] += 1
        return original(*args, **kwargs)

    def counting_settled(self, x):
        y = original_settled(self, x)
        fused_calls[0] += y is not None
        return y

    functional.lora_linear = counting
    functional.SettledTrainingCall.output = counting_settled
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per = BATCH // world
    rows = slice(rank * per, (rank + 1) * per)

    def mean_over_ranks(loss):
        dist.all_reduce(loss)
        return loss.item() / world

    # DDP
    model = build_model()
    losses = train(DDP(model), rows, mean_over_ranks)
    if rank == 0:
        torch.save({"losses": losses, "weights": adapter_weights(model), "fused_calls": fused_calls[0]},
                   os.path.join(out_dir, "ddp.pt"))
        model.save_pretrained(os.path.join(out_dir, "ddp_adapter"))
    dist.barrier()

    # FSDP2: shard each decoder block, then the root
    model = build_model()
    fused_calls[0] = 0
    for block in model.base_model.model.model.layers:
        fully_shard(block)
    fully_shard(model)
    losses = train(model, rows, mean_over_ranks)
    weights = adapter_weights(model)  # full_tensor() is a collective: every rank calls it
    full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"losses": losses, "weights": weights, "fused_calls": fused_calls[0]},
                   os.path.join(out_dir, "fsdp.pt"))
        model.save_pretrained(os.path.join(out_dir, "fsdp_adapter"), state_dict=full_state)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, str(out)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed workers timed out")
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return out, single_process()


def _compare(run: dict, reference) -> None:
    ref_losses, ref_weights = reference
    assert len(run["losses"]) == STEPS
    assert run["fused_calls"] == 14 * STEPS, f"{run['fused_calls']} fused calls, expected 14 per step"
    for step, (got, want) in enumerate(zip(run["losses"], ref_losses)):
        assert abs(got - want) <= 1e-5 * abs(want), f"step {step}: loss {got} != single-process {want}"
    assert ref_losses[-1] < ref_losses[0], "training did not move the loss; the comparison would be vacuous"
    assert run["weights"].keys() == ref_weights.keys() and len(ref_weights) == 28
    initial = adapter_weights(build_model())
    for name, want in ref_weights.items():
        got = run["weights"][name]
        assert not torch.equal(want, initial[name]), f"{name} did not change in training"
        err = ((got - want).norm() / want.norm()).item()
        assert err <= 1e-5, f"{name}: relative error {err:.2e} against the single-process run"


def _check_peft_format(adapter_dir, ref_weights) -> None:
    """PEFT's own loader reads the rank-0 adapter into a fresh model, and the loaded weights are the trained ones."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    assert sorted(os.listdir(adapter_dir)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    loaded = PeftModel.from_pretrained(LlamaForCausalLM(config), adapter_dir)
    state = loaded.state_dict()
    for name, want in ref_weights.items():
        key = name
        assert key in state, f"{key} missing after PeftModel.from_pretrained"
        err = ((state[key] - want).norm() / want.norm()).item()
        assert err <= 1e-5, f"{key}: loaded adapter differs from the trained one ({err:.2e})"


@pytest.mark.dist
def test_ddp_two_processes_equal_single_process(dist_runs):
    out, reference = dist_runs
    _compare(torch.load(out / "ddp.pt"), reference)
    _check_peft_format(out / "ddp_adapter", reference[1])


@pytest.mark.dist
def test_fsdp2_two_processes_equal_single_process(dist_runs):
    out, reference = dist_runs
    _compare(torch.load(out / "fsdp.pt"), reference)
    _check_peft_format(out / "fsdp_adapter", reference[1])


if __name__ == "__main__":
    # fastpeft comes from the installed package, as in a user's job: the repository root stays off sys.path, where its
    # kernels/ would shadow the `kernels` package that bitsandbytes (imported by transformers) looks for.
    _worker(sys.argv[1])
    # Everything is saved and the process group is destroyed: end here, past the interpreter's teardown, where a
    # worker has now and then aborted after finishing its work ("terminate called without an active exception", a
    # background thread of torch.distributed destroyed while joinable). An error during the work still exits
    # non-zero, through the exception.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
