"""Build the engine `parallel.engine` names: one process or FSDP2 (parallel/engine.py, parallel/fsdp.py), or
DeepSpeed ZeRO (parallel/deepspeed.py). Kept apart from them so that neither engine module imports the
other's (what both use lives in materialize.py, activation_checkpointing.py and compile.py);
tests/test_imports.py checks it."""
from parallel.activation_checkpointing import apply_activation_checkpointing
from parallel.compile import apply_compile
from parallel.engine import Engine
from parallel.fsdp import apply_fsdp
from parallel.materialize import build_model
from parallel.mesh import fsdp_mesh
from parallel.topology import Topology


def build_engine(cfg, topology: Topology, initial_weights=None):
    """Build the model for `cfg.model` the way `topology.engine` holds it, and its engine; the weights start
    from `initial_weights` (checkpoints/initial.py) when given, else from the seed."""
    if topology.engine == "deepspeed":
        from parallel.deepspeed import DeepSpeedEngine  # imports deepspeed: only when asked for

        return DeepSpeedEngine(cfg, topology, initial_weights)

    def wrap(model) -> None:  # on the meta device, before the weights are allocated
        apply_activation_checkpointing(model, cfg.parallel)
        if cfg.train.compile:
            apply_compile(model)
        if topology.engine == "fsdp":
            apply_fsdp(model, fsdp_mesh(topology.mesh), cfg.parallel, topology.device)

    model = build_model(cfg.model, topology.device, cfg.run.seed, wrap, initial_weights)
    return Engine(model, cfg.optim, topology)

