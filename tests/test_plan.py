"""``chatloop plan`` and ``chatloop bench-host``: hosts files, model shapes, the solver's optimality, outputs.

The solver is held to brute force over every contiguous split and every grouping of hosts into replicas on
small cases, and hypothesis checks that memory limits hold on random ones. Shapes predicted for a
quantization are held to what llama.cpp's quantizer actually writes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pathlib
import random
import subprocess
import sys

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from chatloop.bind_policy import insecure_bind_error
from chatloop.config import ConfigError, CoordinatorConfig, StageConfig, load_config
from chatloop.plan.hosts import GIB, MIB, HostsFile, load_hosts
from chatloop.plan.model_shape import ModelShape, ShapeError, from_converted, from_gguf, from_hf_config, load_shape
from chatloop.plan.planner import PlanError, load_plan, make_plan
from chatloop.plan.quant_sizes import tensor_type, use_more_bits
from chatloop.plan.render import TOKEN_FILE, compose, coordinator_config, stage_config, table, write_outputs
from chatloop.plan.solver import HostCap, NoFit, Problem, add_replicas, evaluate, solve, stage_memory
from tests.deploy_files import load_schema

LLAMA3_70B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}


def write_hosts(path: pathlib.Path, hosts: list[dict], **settings_) -> pathlib.Path:
    path.write_text(yaml.safe_dump({**settings_, "hosts": hosts}))
    return path


def host(name: str, memory_gb: float = 8, cores: int = 4, **extra) -> dict:
    return {"name": name, "address": f"{name}.lan", "memory_gb": memory_gb, "cores": cores, **extra}


# -- hosts.yaml ---------------------------------------------------------------------------------------------


def test_hosts_file_loads(tmp_path) -> None:
    cfg = load_hosts(
        write_hosts(
            tmp_path / "h.yaml",
            [host("a", cpu_cores="0-3", numa_nodes=[0]), host("b", speed={"decode_gb_s": 12.5})],
            context_tokens=2048,
        )
    )
    assert [h.name for h in cfg.hosts] == ["a", "b"]
    assert cfg.context_tokens == 2048 and cfg.hosts[1].speed.decode_gb_s == 12.5 and cfg.hosts[0].numa_nodes == (0,)


EXAMPLE_HOSTS = pathlib.Path(__file__).parent.parent / "configs" / "plan" / "hosts.yaml"


def test_example_hosts_file_is_valid_and_documents_every_key() -> None:
    from tests.test_config_examples import _DEFAULT, _default_of, _leaf_paths, documented_keys

    cfg = load_hosts(EXAMPLE_HOSTS)
    assert len(cfg.hosts) == 3
    docs = documented_keys(EXAMPLE_HOSTS)
    for key_path, f in _leaf_paths(HostsFile).items():
        doc = docs.get(key_path)
        assert doc and len(doc.split()) >= 4, f"{'.'.join(key_path)}: not shown with a comment saying what it means"
        default = _default_of(f)
        if default is dataclasses.MISSING:
            assert "required" in doc.lower(), f"{'.'.join(key_path)}: say it is required"
            continue
        m = _DEFAULT.search(doc)
        assert m and yaml.safe_load(m.group(1)) == default, f"{'.'.join(key_path)}: default not stated as in code"


@pytest.mark.parametrize(
    ("hosts", "extra", "message"),
    [
        ([host("a", memory_gb=-4)], {}, "hosts[0].memory_gb: must be greater than 0"),
        ([host("a"), host("a")], {}, "hosts[1].name: duplicate host name 'a'"),
        ([host("a", colour="red")], {}, "hosts[0]: unknown key 'colour'"),
        ([host("a")], {"sequencez": 3}, "unknown key 'sequencez'"),
        ([host("a", cores=0)], {}, "hosts[0].cores: must be greater than 0"),
        ([host("a", cpu_cores="3-1")], {}, "hosts[0].cpu_cores"),
        ([host("a", numa_nodes=[0, 0])], {}, "hosts[0].numa_nodes"),
        ([host("a", speed={"decode_gb_s": 0})], {}, "hosts[0].speed.decode_gb_s"),
        ([host("a", speed={"decode_gb_s": 5, "head_gb_s": -1})], {}, "hosts[0].speed.head_gb_s: must be greater"),
        (
            [host("a", speed={"decode_gb_s": 5, "last_step_overhead_ms": -0.5})],
            {},
            "hosts[0].speed.last_step_overhead_ms: must be 0 or more",
        ),
        ([host("a", memory_gb="lots")], {}, "hosts[0].memory_gb: expected a number"),
        ([host("a")], {"coordinator_host": "z"}, "coordinator_host: 'z' is not one of the hosts"),
        ([], {}, "needs at least one host"),
        ([{"name": "a", "address": "x", "cores": 2}], {}, "hosts[0].memory_gb: required key missing"),
        ([host("a/b")], {}, "hosts[0].name"),
    ],
)
def test_bad_hosts_files_name_the_key(tmp_path, hosts, extra, message) -> None:
    path = write_hosts(tmp_path / "bad.yaml", hosts, **extra)
    with pytest.raises(ConfigError) as err:
        load_hosts(path)
    assert message in str(err.value) and str(path) in str(err.value)


# -- model shapes -------------------------------------------------------------------------------------------


def test_use_more_bits_matches_llama_cpp() -> None:
    # llama.cpp: i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2; for 32 layers: 0-3, 6, 9, ..., 27, 28-31
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_q4_k_m_tensor_types() -> None:
    q = tensor_type
    assert q("blk.0.attn_v.weight", (8192, 1024), "q4_k_m", 80, "llama", False).name == "Q6_K"
    assert q("blk.11.attn_v.weight", (8192, 1024), "q4_k_m", 80, "llama", False).name == "Q5_K"  # the "70B" rule
    assert q("blk.11.attn_v.weight", (4096, 1024), "q4_k_m", 32, "llama", False).name == "Q4_K"
    assert q("blk.11.attn_q.weight", (8192, 8192), "q4_k_m", 80, "llama", False).name == "Q4_K"
    assert q("output.weight", (8192, 128256), "q4_k_m", 80, "llama", False).name == "Q6_K"
    assert q("token_embd.weight", (576, 49152), "q4_k_m", 30, "llama", True).name == "Q8_0"  # tied head, 576 % 256
    assert q("blk.0.attn_norm.weight", (8192,), "q4_k_m", 80, "llama", False).name == "F32"


def test_llama3_70b_from_config_alone() -> None:
    shape = from_hf_config(LLAMA3_70B, "q4_k_m", name="Meta-Llama-3-70B", source="meta-llama/Meta-Llama-3-70B")
    assert shape.n_layer == 80 and not shape.tied
    assert shape.kv_bytes_per_token_layer == 8 * 128 * 2 * 2  # 8 KV heads x 128 x (K + V) x f16
    # llama.cpp's Meta-Llama-3-70B Q4_K_M GGUF is 42.5 GB (39.6 GiB).
    assert 41.5e9 < shape.weight_bytes < 43.5e9, shape.weight_bytes
    f16 = from_hf_config(LLAMA3_70B, "f16", name="x", source="")
    assert abs(f16.weight_bytes - 2 * 70.55e9) < 0.5e9


@pytest.fixture(scope="module")
def smol_shape(smollm2_gguf) -> ModelShape:
    """The demo model's shape as stored (read once: parsing its header takes seconds on a busy machine)."""
    return from_gguf(smollm2_gguf)


def test_shape_of_gguf_keep_matches_the_file(smollm2_gguf, smol_shape) -> None:
    from chatloop.modelfiles.gguf_info import read_gguf_info

    shape, info = smol_shape, read_gguf_info(smollm2_gguf)
    assert shape.layer_bytes == info.layer_bytes and shape.tied and shape.n_layer == 30
    assert shape.head_bytes == info.head_bytes and shape.embedding_bytes == info.embedding_bytes
    assert shape.kv_bytes_per_token_layer == 3 * 64 * 2 * 2  # 3 KV heads of 64


def test_shape_of_converted_folder_matches_its_source(smollm2_gguf, smol_shape, stage_dir) -> None:
    whole, sliced = smol_shape, from_converted(stage_dir(smollm2_gguf, 2))
    assert sliced.layer_bytes == whole.layer_bytes
    assert (sliced.embedding_bytes, sliced.head_bytes, sliced.kv_bytes_per_token_layer) == (
        whole.embedding_bytes,
        whole.head_bytes,
        whole.kv_bytes_per_token_layer,
    )


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m", "q4_0"])
def test_predicted_sizes_match_llama_cpps_quantizer(tiny_llama_gguf, stage_dir, quant) -> None:
    predicted = from_gguf(tiny_llama_gguf, quant)
    actual = from_converted(stage_dir(tiny_llama_gguf, 2, quant=quant))
    assert predicted.layer_bytes == actual.layer_bytes
    assert (predicted.embedding_bytes, predicted.head_bytes) == (actual.embedding_bytes, actual.head_bytes)


def test_bad_models_are_named(tmp_path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"nope")
    with pytest.raises(ShapeError, match="not a GGUF"):
        load_shape(str(tmp_path / "x.gguf"))
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA3_70B, "hidden_size": -1}))
    with pytest.raises(ShapeError, match="hidden_size"):
        load_shape(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA3_70B, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ShapeError, match="not supported"):
        load_shape(str(tmp_path / "config.json"))
    with pytest.raises(ShapeError, match="keep needs a GGUF"):
        from_hf_config(LLAMA3_70B, "keep", name="m", source="")
    with pytest.raises(ShapeError, match="--quant"):
        load_shape("whatever", "q3_k")
    with pytest.raises(ShapeError, match="not a Hugging Face model id"):
        load_shape(str(tmp_path / "missing" / "deeper"))


# -- the solver ---------------------------------------------------------------------------------------------


def brute_force(p: Problem) -> float:
    """Smallest bottleneck over every contiguous split and every chain of distinct hosts (any may sit out)."""
    n, n_layer = len(p.hosts), p.n_layer
    best = math.inf
    for n_stages in range(1, min(n, n_layer) + 1):
        for cuts in itertools.combinations(range(1, n_layer), n_stages - 1):
            bounds = [0, *cuts, n_layer]
            ranges = list(zip(bounds, bounds[1:]))
            for chain in itertools.permutations(range(n), n_stages):
                v = evaluate(p, [(lo, hi, (h,)) for (lo, hi), h in zip(ranges, chain)])
                if v is not None:
                    best = min(best, v)
    return best


def random_problem(rng: random.Random, n_hosts: int, n_layer: int) -> Problem:
    layer = tuple(rng.randint(50, 150) for _ in range(n_layer))
    return Problem(
        layer_time=layer,
        layer_mem=tuple(b + rng.randint(0, 40) for b in layer),
        hosts=tuple(
            HostCap(
                memory_bytes=rng.randint(150, 900),
                bytes_per_ms=rng.uniform(5, 60),
                step_ms=rng.uniform(0, 2),
                head_bytes_per_ms=rng.choice([None, rng.uniform(2, 120)]),
                # the last stage's fixed cost may be below the others' (the end then is reachable where the layer
                # before it is not) or above
                last_step_ms=rng.choice([None, rng.uniform(0, 4)]),
            )
            for _ in range(n_hosts)
        ),
        first_mem=rng.randint(0, 100),
        last_mem=rng.randint(0, 100),
        last_time=rng.randint(0, 100),
        process_mem=rng.randint(0, 50),
    )


def test_solver_matches_brute_force() -> None:
    rng = random.Random(19)
    checked = 0
    for _ in range(120):
        p = random_problem(rng, rng.randint(1, 4), rng.randint(1, 7))
        expected = brute_force(p)
        if math.isinf(expected):
            with pytest.raises(NoFit):
                solve(p)
            continue
        got = solve(p)
        assert got.bottleneck_ms == pytest.approx(expected, rel=1e-8), p
        assert evaluate(p, [(s.start, s.end, s.hosts) for s in got.stages]) == pytest.approx(got.bottleneck_ms)
        checked += 1
    assert checked > 60


def test_a_cheap_last_step_makes_the_end_reachable() -> None:
    # Host 1 is fast but pays 200 ms a step unless it is the last stage (0 ms there): it can hold layers 2:4 and
    # the head within 150 ms, though no range that stops before the end fits that bound. A search that assumes
    # a longer range never costs less misses it and settles for 250 ms.
    p = Problem(
        layer_time=(100,) * 4,
        layer_mem=(100,) * 4,
        hosts=(
            HostCap(10**6, 1.0, step_ms=50.0, last_step_ms=0.0),
            HostCap(10**6, 2.0, step_ms=200.0, last_step_ms=0.0),
            HostCap(10**6, 1.0, step_ms=50.0),
        ),
        last_time=100,
    )
    got = solve(p)
    assert got.bottleneck_ms == pytest.approx(brute_force(p)) == pytest.approx(150.0)


def test_spare_hosts_become_replicas_of_the_slowest_stage() -> None:
    # Three hosts, one of them too small for anything but the lighter half: the chain uses two hosts
    # (more stages would not lower the bound: 2 layers), the third joins the slower stage it can hold.
    p = Problem(
        layer_time=(100, 100),
        layer_mem=(100, 100),
        hosts=(HostCap(10**6, 10.0), HostCap(10**6, 10.0), HostCap(150, 10.0)),
        last_time=50,
    )
    chain = solve(p)
    assert chain.bottleneck_ms == pytest.approx(brute_force(p)) == pytest.approx(15.0)
    with_replicas = add_replicas(p, chain)
    assert with_replicas.bottleneck_ms <= chain.bottleneck_ms
    groups = {s.start: s.hosts for s in with_replicas.stages}
    assert sorted(len(g) for g in groups.values()) == [1, 2]
    assert evaluate(p, [(s.start, s.end, s.hosts) for s in with_replicas.stages]) is not None


def test_the_heads_own_speed_prices_the_last_stage() -> None:
    # Two equal hosts, 10 layers of 100 bytes and a 300-byte head. Priced at the layers' speed the head weighs
    # 3 layers (split 6.5 / 3.5 + head: 7 / 3 gives 700 vs 600); at twice their speed 1.5 layers (6 / 4: 600 vs
    # 550), at half 6 layers (8 / 2: 800 vs 800). A head the planner misprices makes the last stage the bottleneck.
    def split(head_speed):
        hosts = tuple(HostCap(10**6, 1.0, 0.0, head_speed) for _ in range(2))
        p = Problem(layer_time=(100,) * 10, layer_mem=(100,) * 10, hosts=hosts, last_time=300)
        got = solve(p)
        assert got.bottleneck_ms == pytest.approx(brute_force(p))
        return [s.end - s.start for s in got.stages], got.bottleneck_ms

    assert split(None) == split(1.0) == ([7, 3], 700.0)
    assert split(2.0) == ([6, 4], 600.0)
    assert split(0.5) == ([8, 2], 800.0)


def test_measured_head_speed_reaches_the_plan(tmp_path, smol_shape) -> None:
    speed = {"decode_gb_s": 5.0, "step_overhead_ms": 0.0}
    plain = load_hosts(write_hosts(tmp_path / "a.yaml", [host("a", speed=speed), host("b", speed=speed)]))
    slow_head = {**speed, "head_gb_s": 1.0}
    slow = load_hosts(write_hosts(tmp_path / "b.yaml", [host("a", speed=slow_head), host("b", speed=slow_head)]))
    p_plain, p_slow = make_plan(smol_shape, plain), make_plan(smol_shape, slow)
    assert p_slow.stages[-1].start > p_plain.stages[-1].start  # the last stage gives layers up for its head
    last = p_slow.stages[-1]
    head_ms = smol_shape.head_bytes / 1e6  # 1 GB/s
    layers_ms = sum(smol_shape.layer_bytes[last.start : last.end]) / 5e6
    assert last.ms_per_token == pytest.approx(head_ms + layers_ms)


def test_each_role_pays_its_own_step_overhead(tmp_path, smol_shape) -> None:
    """bench-host measures a served step of a passing (first or middle) stage and of the last stage apart; a plan
    charges each stage its role's: a last stage cheaper per step takes more layers than with one price for all."""
    speed = {"decode_gb_s": 5.0, "step_overhead_ms": 3.0}
    same = load_hosts(write_hosts(tmp_path / "a.yaml", [host("a", speed=speed), host("b", speed=speed)]))
    cheap_last = {**speed, "last_step_overhead_ms": 0.5}
    apart = load_hosts(write_hosts(tmp_path / "b.yaml", [host("a", speed=cheap_last), host("b", speed=cheap_last)]))
    p_same, p_apart = make_plan(smol_shape, same), make_plan(smol_shape, apart)
    assert p_apart.stages[-1].start < p_same.stages[-1].start
    first, last = p_apart.stages
    layers_ms = sum(smol_shape.layer_bytes[last.start : last.end]) / 5e6
    assert last.ms_per_token == pytest.approx(0.5 + layers_ms + smol_shape.head_bytes / 5e6)
    layers_ms = sum(smol_shape.layer_bytes[first.start : first.end]) / 5e6
    assert first.ms_per_token == pytest.approx(3.0 + layers_ms)


@settings(max_examples=60, deadline=None)
@given(
    layers=st.lists(st.integers(1, 1000), min_size=1, max_size=24),
    hosts=st.lists(st.tuples(st.integers(1, 6000), st.floats(0.5, 100), st.floats(0, 3)), min_size=1, max_size=5),
    kv=st.integers(0, 300),
    ends=st.tuples(st.integers(0, 500), st.integers(0, 500), st.integers(0, 200)),
)
def test_memory_limits_always_hold(layers, hosts, kv, ends) -> None:
    p = Problem(
        layer_time=tuple(layers),
        layer_mem=tuple(b + kv for b in layers),
        hosts=tuple(HostCap(m, r, o) for m, r, o in hosts),
        first_mem=ends[0],
        last_mem=ends[1],
        process_mem=ends[2],
        last_time=ends[1],
    )
    try:
        s = solve(p)
    except NoFit:
        # nothing fits: not even the lightest single layer on the biggest host, or no split works at all
        return
    covered = 0
    used: set[int] = set()
    for stage in s.stages:
        assert stage.start == covered and stage.end > stage.start
        covered = stage.end
        for h in stage.hosts:
            assert h not in used
            used.add(h)
            assert stage_memory(p, stage.start, stage.end) <= p.hosts[h].memory_bytes
    assert covered == len(layers)


# -- plans --------------------------------------------------------------------------------------------------


def hosts_file(hosts: list[dict], **kw) -> HostsFile:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return load_hosts(write_hosts(pathlib.Path(tmp) / "h.yaml", hosts, **kw))


def test_faster_hosts_get_more_layers(smol_shape) -> None:
    hosts = hosts_file(
        [host("slow", speed={"decode_gb_s": 5.0}), host("fast", speed={"decode_gb_s": 10.0})], sequences=2
    )
    plan = make_plan(smol_shape, hosts)
    by_host = {p.host: s for s in plan.stages for p in s.processes if not p.spare}
    assert by_host["fast"].end - by_host["fast"].start > by_host["slow"].end - by_host["slow"].start
    for s in plan.stages:
        for p in s.processes:
            assert p.memory_mb <= 8 * 1024


def test_plans_are_deterministic(smol_shape) -> None:
    hosts = hosts_file([host("a", cores=2), host("b", cores=3), host("c", memory_gb=1, cores=8)])
    shape = smol_shape
    assert make_plan(shape, hosts).to_json() == make_plan(shape, hosts).to_json()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.floats(0.3, 4.0), st.integers(1, 32)), min_size=1, max_size=4))
def test_plan_processes_fit_their_hosts(specs) -> None:
    shape = from_hf_config(
        {
            **LLAMA3_70B,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 16,
            "num_attention_heads": 16,
        },
        "q8_0",
        name="m",
        source="",
    )
    hosts = hosts_file([host(f"h{i}", memory_gb=m, cores=c) for i, (m, c) in enumerate(specs)], context_tokens=1024)
    try:
        plan = make_plan(shape, hosts)
    except PlanError:
        return
    memory = {h.name: h.memory_gb * GIB for h in hosts.hosts}
    held: dict[str, float] = {}
    for s in plan.stages:
        for p in s.processes:
            held[p.host] = held.get(p.host, 0) + p.memory_mb * MIB
    assert all(held[h] <= memory[h] + 1 for h in held)


def test_no_fit_says_how_much_is_missing_and_which_quant_fits() -> None:
    hosts = hosts_file([host(f"h{i}", memory_gb=16) for i in range(4)])
    shape = from_hf_config(LLAMA3_70B, "f16", name="llama3-70b", source="")
    with pytest.raises(PlanError) as err:
        make_plan(shape, hosts, shape_at=lambda q: from_hf_config(LLAMA3_70B, q, name="llama3-70b", source=""))
    msg = str(err.value)
    assert "does not fit" in msg and "GiB more" in msg and "fits at --quant q4_k_m" in msg
    tiny = hosts_file([host("h", memory_gb=0.5)])
    with pytest.raises(PlanError, match="No quantization ChatLoop offers makes it fit"):
        make_plan(shape, tiny, shape_at=lambda q: from_hf_config(LLAMA3_70B, q, name="llama3-70b", source=""))


def test_llama3_70b_on_four_64gb_hosts() -> None:
    """The README example: Llama-3-70B at q4_k_m on four 64 GB hosts (config only, no weights)."""
    hosts = hosts_file([host(f"box-{c}", memory_gb=64, cores=16) for c in "abcd"], context_tokens=8192, sequences=8)
    shape = from_hf_config(LLAMA3_70B, "q4_k_m", name="Meta-Llama-3-70B", source="meta-llama/Meta-Llama-3-70B")
    plan = make_plan(shape, hosts)
    # The figures README.md quotes ("Planning a deployment").
    assert [(s.start, s.end) for s in plan.stages] == [(0, 20), (20, 41), (41, 62), (62, 80)]
    assert [p.host for s in plan.stages for p in s.processes] == ["box-a", "box-b", "box-c", "box-d"]
    assert round(plan.bottleneck_ms, 2) == 132.53
    assert [round(s.weights_mb) for s in plan.stages] == [10529, 10073, 10073, 9868]
    assert "132.53 ms per token" in table(plan, hosts)


def test_outputs_are_valid_configs(tmp_path, smol_shape) -> None:
    hosts = hosts_file(
        [host("a", cpu_cores="0-3", numa_nodes=[1]), host("b", memory_gb=2, cores=2)],
        coordinator_host="b",
        sequences=40,
    )
    plan = make_plan(smol_shape, hosts)
    files = {p.name for p in write_outputs(plan, hosts, tmp_path)}
    assert {"plan.json", "plan.txt", "convert.sh", "coordinator.yaml", "compose.yaml", TOKEN_FILE} <= files
    # The processes listen on 0.0.0.0: they must start under the bind policy with the plan's own token.
    token_file = tmp_path / TOKEN_FILE
    assert token_file.stat().st_mode & 0o077 == 0
    env = dict(line.split("=", 1) for line in token_file.read_text().splitlines() if line and not line.startswith("#"))
    assert list(env) == ["CHATLOOP_SECURITY__CLUSTER_TOKEN"] and len(env["CHATLOOP_SECURITY__CLUSTER_TOKEN"]) == 64
    for s in plan.stages:
        for p in s.processes:
            cfg = load_config(StageConfig, tmp_path / f"stage-{p.stage}-{p.host}.yaml", env=env)
            assert cfg.layer_group == p.stage and cfg.port == p.port and cfg.max_sequences == 40
            assert cfg.performance.n_ubatch >= 40
            assert insecure_bind_error("stage", cfg.host, cfg.security.cluster_token, cfg.allow_insecure) is None
            if p.host == "a":
                assert cfg.performance.cpu_cores == "0-3" and cfg.performance.numa_node == 1
    coord = load_config(CoordinatorConfig, tmp_path / "coordinator.yaml", env=env)
    assert coord.security.cluster_token == env["CHATLOOP_SECURITY__CLUSTER_TOKEN"]
    assert insecure_bind_error("coordinator", coord.host, coord.security.cluster_token, coord.allow_insecure) is None
    assert coord.stages == tuple(tuple(p.url for p in s.processes) for s in plan.stages)
    doc = yaml.safe_load((tmp_path / "compose.yaml").read_text())
    errors = list(jsonschema.Draft202012Validator(load_schema("compose.schema.json")).iter_errors(doc))
    assert errors == []
    assert doc["services"]["coordinator"]["profiles"] == ["b"]
    assert all(svc["env_file"] == [TOKEN_FILE] for svc in doc["services"].values())
    assert load_plan(tmp_path / "plan.json") == plan
    assert compose(plan) == doc and coordinator_config(plan)["stages"] == [list(x) for x in coord.stages]
    assert stage_config(plan, plan.stages[0].processes[0])["layer_group"] == 0


def test_bad_plan_files(tmp_path) -> None:
    (tmp_path / "p.json").write_text("{")
    with pytest.raises(PlanError, match="not a readable plan"):
        load_plan(tmp_path / "p.json")
    (tmp_path / "p.json").write_text(json.dumps({"format": 1, "stages": []}))
    with pytest.raises(PlanError, match="missing or unexpected field"):
        load_plan(tmp_path / "p.json")


# -- the commands -------------------------------------------------------------------------------------------


def chatloop(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chatloop.cli", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_plan_then_convert_with_the_plan(tmp_path, tiny_llama_gguf) -> None:
    hosts = write_hosts(
        tmp_path / "hosts.yaml",
        [host("slow", cores=1, speed={"decode_gb_s": 1.0}), host("fast", cores=2, speed={"decode_gb_s": 3.0})],
    )
    r = chatloop("plan", str(tiny_llama_gguf), "--hosts", str(hosts), "--out", str(tmp_path / "plan"))
    assert r.returncode == 0, r.stderr
    assert "bottleneck" in r.stdout and "chatloop convert" in r.stdout
    plan = load_plan(tmp_path / "plan" / "plan.json")
    r = chatloop("convert", "--plan", str(tmp_path / "plan" / "plan.json"), "--out", str(tmp_path / "model"))
    assert r.returncode == 0, r.stderr
    from chatloop.modelfiles.manifest import load_manifest

    m = load_manifest(tmp_path / "model")
    assert [(s.layer_start, s.layer_end) for s in m.stages] == [(s.start, s.end) for s in plan.stages]
    r = chatloop(
        "convert", "--plan", str(tmp_path / "plan" / "plan.json"), "--layers", "0:6", "--out", str(tmp_path / "x")
    )
    assert r.returncode == 2 and "--plan sets --layers" in r.stderr


def test_plan_command_errors(tmp_path, tiny_llama_gguf) -> None:
    bad = write_hosts(tmp_path / "bad.yaml", [host("a", memory_gb=-1)])
    r = chatloop("plan", str(tiny_llama_gguf), "--hosts", str(bad))
    assert r.returncode == 2 and "memory_gb: must be greater than 0" in r.stderr and "Traceback" not in r.stderr
    small = write_hosts(tmp_path / "small.yaml", [host("a", memory_gb=0.01)], overhead_mb=1)
    r = chatloop("plan", str(tiny_llama_gguf), "--hosts", str(small))
    assert r.returncode == 2 and "does not fit" in r.stderr and "Traceback" not in r.stderr
    r = chatloop("convert", "--plan", str(tmp_path / "nope.json"), "--out", str(tmp_path / "m"))
    assert r.returncode == 2 and "not a readable plan" in r.stderr


def test_cli_imports_no_planner_or_llama_cpp_up_front() -> None:
    code = "import sys, chatloop.cli; print(sorted(m for m in sys.modules if m.startswith(('chatloop.plan', 'llama_cpp'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "chatloop.plan" not in out, out


def test_bench_host_prints_a_usable_entry(tmp_path, tiny_llama_gguf) -> None:
    r = chatloop(
        "bench-host",
        "--model",
        str(tiny_llama_gguf),
        "--threads",
        "1",
        "--steps",
        "5",
        "--name",
        "here",
        "--address",
        "127.0.0.1",
        "--memory-gb",
        "2",
    )
    assert r.returncode == 0, r.stderr
    (tmp_path / "hosts.yaml").write_text("hosts:\n" + r.stdout)
    cfg = load_hosts(tmp_path / "hosts.yaml")
    h = cfg.hosts[0]
    assert h.name == "here" and h.cores == 1 and h.speed.decode_gb_s > 0 and h.speed.threads == 1
    assert h.speed.head_gb_s > 0 and "; head " in r.stdout
    # served steps timed on real stage processes, each role's joining its step overhead
    assert "ms more a served step keeps a stage busy" in r.stdout
    assert h.speed.step_overhead_ms > 0 and h.speed.last_step_overhead_ms > 0
    r = chatloop("bench-host", "--model", str(tmp_path / "none.gguf"))
    assert r.returncode == 2 and "no such file" in r.stderr
    r = chatloop("bench-host", "--steps", "0")
    assert r.returncode == 2 and "--steps must be 1 or more" in r.stderr


def test_bench_host_synthetic_layer(tmp_path) -> None:
    """Without --model: a synthetic 1B-class Q8_0 layer (written as quantized blocks, about 260 MB of files)."""
    r = chatloop("bench-host", "--threads", "1", "--steps", "3", "--name", "syn", "--memory-gb", "1")
    assert r.returncode == 0, r.stderr
    assert "synthetic 1B-class Q8_0 layer" in r.stdout
    (tmp_path / "hosts.yaml").write_text("hosts:\n" + r.stdout)
    assert load_hosts(tmp_path / "hosts.yaml").hosts[0].speed.decode_gb_s > 0


def test_last_level_cache_size(tmp_path) -> None:
    """bench-host times enough layers to overflow the last-level cache (read from sysfs, as Linux writes it)."""
    from chatloop.plan.bench_host import last_level_cache_bytes  # noqa: PLC0415

    for index, (level, size) in enumerate([(1, "32K"), (2, "1024K"), (3, "32768K"), (1, "64K")]):
        d = tmp_path / f"index{index}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "size").write_text(f"{size}\n")
    assert last_level_cache_bytes(str(tmp_path)) == 32 * 1024**2
    (tmp_path / "index2" / "size").write_text("garbled\n")
    assert last_level_cache_bytes(str(tmp_path)) == 1024**2
    assert last_level_cache_bytes(str(tmp_path / "missing")) == 0


def test_cpu_quota_of_the_cgroup(tmp_path) -> None:
    """A container's CPU limit must show in bench-host's speed: a single decode runs at full speed under a quota,
    sustained decoding does not (chatloop/plan/bench_host.py)."""
    from chatloop.plan.bench_host import cpu_quota_cores  # noqa: PLC0415

    def proc(text: str) -> str:
        path = tmp_path / f"cgroup-{abs(hash(text))}"
        path.write_text(text)
        return str(path)

    v2 = tmp_path / "v2"
    (v2 / "kubepods" / "pod1").mkdir(parents=True)
    (v2 / "kubepods" / "cpu.max").write_text("150000 100000\n")
    (v2 / "kubepods" / "pod1" / "cpu.max").write_text("max 100000\n")
    assert cpu_quota_cores(proc("0::/kubepods/pod1\n"), str(v2)) == 1.5  # the parent's limit holds
    (v2 / "kubepods" / "pod1" / "cpu.max").write_text("50000 100000\n")
    assert cpu_quota_cores(proc("0::/kubepods/pod1\n"), str(v2)) == 0.5
    assert cpu_quota_cores(proc("0::/\n"), str(v2)) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "half").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "half" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu,cpuacct" / "half" / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota_cores(proc("4:memory:/x\n2:cpu,cpuacct:/half\n"), str(v1)) == 0.5
    assert cpu_quota_cores(proc("2:cpu,cpuacct:/\n"), str(v1)) is None
    assert cpu_quota_cores(str(tmp_path / "missing"), str(v1)) is None
    (v2 / "kubepods" / "pod1" / "cpu.max").write_text("garbage\n")
    assert cpu_quota_cores(proc("0::/kubepods/pod1\n"), str(v2)) == 1.5


def test_served_step_overhead_is_the_event_loops_cpu(stage_dir, tiny_llama_gguf) -> None:
    """bench-host serves its last-stage and middle-stage files from real stage processes and reads each event
    loop's CPU per step; the middle stage passes every step on to the next stage's stream (a sink standing in)."""
    from chatloop.plan.served_step import served_step  # noqa: PLC0415

    directory = stage_dir(tiny_llama_gguf, stages=3)
    for file in ("stage-1.gguf", "stage-2.gguf"):
        step = served_step(directory / file, threads=1, steps=8)
        assert 0 < step.loop_cpu_ms < step.process_cpu_ms, file
        assert 0 < step.forward_ms < step.busy_ms < math.inf, file


def test_served_step_keeps_two_sequences_steps_in_flight() -> None:
    """bench-host's driver streams steps as a coordinator of two micro-batches does: after each sequence's first step
    alone, two steps are out at once (the stage always has the next frame waiting), each sequence's positions follow
    one another, and a run takes exactly the steps it was asked for. A stand-in stage passes every frame on."""
    import asyncio  # noqa: PLC0415

    import aiohttp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from chatloop.plan import served_step  # noqa: PLC0415
    from chatloop.protocol.chain import encode_chain  # noqa: PLC0415
    from chatloop.protocol.frames import decode_frame  # noqa: PLC0415

    target = served_step._Target("http://stage", "t", None, 1, 3, 4)

    class Stage:
        """Holds the frames sent to it; ``pass_on`` passes the oldest on to the next stage."""

        def __init__(self, arrived: asyncio.Queue) -> None:
            self.arrived, self.held, self.sent, self.most_out = arrived, [], [], 0

        async def send_bytes(self, buf: bytes) -> None:
            header, _ = decode_frame(buf)
            self.sent.append(header)
            self.held.append(header)
            self.most_out = max(self.most_out, len(self.held))
            asyncio.get_running_loop().call_soon(self.pass_on)

        def pass_on(self) -> None:
            h = self.held.pop(0)
            rows = np.zeros((1, 4), np.float32)
            frame = encode_chain(h["coord"], h["step"], h["stage"] + 1, h["steps"], h["route"], h["epoch"], rows)
            self.arrived.put_nowait(("next stage", aiohttp.WSMessage(aiohttp.WSMsgType.BINARY, frame, None)))

    async def scenario() -> Stage:
        arrived: asyncio.Queue = asyncio.Queue()
        stage = Stage(arrived)
        driver = served_step._StepsInFlight(target, stage, arrived)
        await driver.start()
        assert stage.most_out == 1  # each sequence's first step alone: the second one gets a slot apart
        await driver.run(9)
        return stage

    stage = asyncio.run(scenario())
    assert len(stage.sent) == 2 + 9 and not stage.held
    assert stage.most_out == 2  # two micro-batches' steps out at once, never more
    by_seq: dict[int, list[int]] = {}
    for h in stage.sent:
        (step,) = h["steps"]
        by_seq.setdefault(step["seq"], []).append(step["pos"])
    assert {seq: positions == list(range(len(positions))) for seq, positions in by_seq.items()} == {1: True, 2: True}
    assert [s["step"] for s in stage.sent] == sorted({s["step"] for s in stage.sent})  # step ids only grow


def test_served_step_names_what_went_wrong(stage_dir, tiny_llama_gguf, monkeypatch) -> None:
    import socket  # noqa: PLC0415

    from chatloop.plan import served_step  # noqa: PLC0415

    directory = stage_dir(tiny_llama_gguf, stages=2)
    with pytest.raises(served_step.ServedStepError, match="not a later stage"):
        served_step.served_step(directory / "stage-0.gguf", threads=1, steps=2)
    with socket.socket() as taken:  # the port the stage is given is in use: it cannot start
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(served_step, "free_port", lambda: taken.getsockname()[1])
        with pytest.raises(served_step.ServedStepError, match="exited with code .*the stage's log ends: .+"):
            served_step.served_step(directory / "stage-1.gguf", threads=1, steps=2)
    monkeypatch.undo()  # free ports again
    # A stage that answers but refuses the stream (here: a path it does not serve): an error, not a traceback.
    monkeypatch.setattr(served_step, "STREAM_PATH", "/v1/no-such-stream")
    with pytest.raises(served_step.ServedStepError, match="could not drive the stage: WSServerHandshakeError"):
        served_step.served_step(directory / "stage-1.gguf", threads=1, steps=2)
