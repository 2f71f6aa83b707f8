"""Walking jaxprs in tests: what a traced program contains (primitives, collective operands)."""


def eqns(jaxpr):
    """Every equation of a jaxpr, nested ones (shard_map, pjit, loops) included."""
    import jax

    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else (v,)):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    yield from eqns(inner)


def count_primitives(jaxpr, name: str) -> int:
    return sum(eqn.primitive.name == name for eqn in eqns(jaxpr))


def allreduce_rows(jaxpr) -> list[int]:
    """Rows (dim 1 of [B, T, D]) of every all-reduce operand of a decode step."""
    return [eqn.invars[0].aval.shape[1] for eqn in eqns(jaxpr)
            if eqn.primitive.name.startswith("psum") and len(eqn.invars[0].aval.shape) == 3]
