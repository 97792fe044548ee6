"""The engine under torch FSDP on CPU (gloo): ``python fsdp_engine.py OUT [CONFIG ...]`` trains every configuration
with 2 processes (``torch.multiprocessing.spawn``) and writes each one's full final weights to ``OUT/<config>.pt``.

A configuration is ``<model>_<sharding>[_ckpt][_resume]``: model ``mlp`` or ``llama`` (a tiny Hugging Face Llama
built from a config); sharding ``fsdp2`` (``fully_shard`` per discovered block, then the root) or ``fsdp1``
(``FullyShardedDataParallel`` with the blocks as auto-wrap units, ``use_orig_params=True`` as Lightning uses);
``ckpt``: activation checkpointing per block; ``resume``: train half the steps, save a sharded checkpoint with
``torch.distributed.checkpoint`` (model, optimizer and the feedback state), rebuild model, optimizer and engine
from other seeds, load it and train the rest. :func:`train` with ``world=1`` is the single-process reference.
Each process also writes the FSDP2 "returned a view tensor" warnings it saw to ``OUT/<config>.warnings.json``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lightning_dfa import FeedbackEngine, discover
from lightning_dfa.sharding import fsdp_auto_wrap_policy, outermost, shard_blocks

CONFIGS = (
    "mlp_fsdp2",
    "llama_fsdp2",
    "llama_fsdp2_ckpt",
    "mlp_fsdp2_resume",
    "llama_fsdp2_resume",
    "mlp_fsdp1",
    "llama_fsdp1",
)
OPTIONS: dict = {}
SHARD: dict = {}
STEPS = 4
BATCH = 8  # the global batch; each of 2 processes takes half


def build(model: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if model == "mlp":
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


def data(model: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    if model == "mlp":
        return [(torch.randn(BATCH, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g)) for _ in range(STEPS)]
    tokens = [torch.randint(0, 48, (BATCH, 9), generator=g) for _ in range(STEPS)]
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def loss_of(model: str, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = net(x) if model == "mlp" else net(input_ids=x, use_cache=False).logits
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def prepare(name: str, seed: int, world: int) -> tuple[nn.Module, FeedbackEngine, torch.optim.Optimizer]:
    """Model (sharded by its blocks when ``world > 1``), attached engine and optimizer."""
    model = name.split("_")[0]
    net = build(model, seed)
    target = discover(net)
    if world > 1 and "fsdp2" in name:
        shard_blocks(net, target, checkpoint="_ckpt" in name, **SHARD)
    elif world > 1 and "fsdp1" in name:
        from torch.distributed.fsdp import FullyShardedDataParallel

        net = FullyShardedDataParallel(
            net, auto_wrap_policy=fsdp_auto_wrap_policy(target), device_id=torch.device("cpu"), use_orig_params=True
        )
    elif "_ckpt" in name:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        from lightning_dfa.sharding import checkpoint_check_fn

        apply_activation_checkpointing(net, check_fn=checkpoint_check_fn(target))
    engine = FeedbackEngine(seed=seed, **OPTIONS)
    engine.attach(net, outermost(net, target))
    return net, engine, torch.optim.Adam(net.parameters(), lr=1e-2)


def steps(
    name: str, net: nn.Module, engine: FeedbackEngine, opt: torch.optim.Optimizer, rank: int, world: int, todo: range
) -> None:
    model = name.split("_")[0]
    for i in todo:
        x, y = data(model)[i]
        if world > 1:
            half = BATCH // world
            x, y = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
        opt.zero_grad()
        loss_of(model, net, x, y).backward()
        engine.end_backward()
        opt.step()


def full_state(net: nn.Module, world: int) -> dict[str, torch.Tensor]:
    if world == 1:
        return {k: v.detach().clone() for k, v in net.state_dict().items()}
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(net, FullyShardedDataParallel):  # (FSDP1's full state dict crashes on CPU: gather the parameters)
        with FullyShardedDataParallel.summon_full_params(net):
            return {k.replace("_fsdp_wrapped_module.", ""): v.detach().clone() for k, v in net.named_parameters()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {
        k.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", ""): v for k, v in state.items()
    }


def train(name: str, rank: int = 0, world: int = 1, out: Path | None = None) -> dict[str, torch.Tensor]:
    """Train ``name`` and return the full final weights (``world=1``: one process, whole batches, no sharding)."""
    net, engine, opt = prepare(name, 0, world)
    if "_resume" not in name:
        steps(name, net, engine, opt, rank, world, range(STEPS))
        return full_state(net, world)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    assert out is not None
    steps(name, net, engine, opt, rank, world, range(STEPS // 2))
    model_state, optim_state = get_state_dict(net, opt)
    path = out / f"{name}.ckpt"
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    if rank == 0:
        torch.save({"dfa": engine.state_dict()}, path / "meta.pt")  # where Lightning keeps non-tensor state
    dist.barrier()
    engine.detach()
    net, engine, opt = prepare(name, 7, world)  # other initial weights and feedback seed: all must come back
    model_state, optim_state = get_state_dict(net, opt)
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, checkpoint_id=path)
    set_state_dict(net, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the saved seed replaces 7, with one warning naming it
        engine.load_state_dict(torch.load(path / "meta.pt", weights_only=False)["dfa"])
    assert engine.config.seed == 0 and any("seed=0" in str(w.message) for w in caught), caught
    steps(name, net, engine, opt, rank, world, range(STEPS // 2, STEPS))
    return full_state(net, world)


def worker(rank: int, world: int, out: str, port: int, names: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name in names:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                state = train(name, rank, world, Path(out))
            views = [str(w.message) for w in caught if "returned a view tensor" in str(w.message)]
            if rank == 0:
                torch.save(state, Path(out) / f"{name}.pt")
                (Path(out) / f"{name}.warnings.json").write_text(json.dumps(views))
        dist.barrier()  # both ranks are done with the group before it goes: no gloo thread left mid-exchange
    finally:
        dist.destroy_process_group()
    # done and written: leave without the interpreter's teardown, where a gloo thread still being destroyed has
    # (rarely) aborted the process with "terminate called without an active exception" after all work was done
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    mp.spawn(worker, args=(2, sys.argv[1], free, sys.argv[2:] or list(CONFIGS)), nprocs=2)
