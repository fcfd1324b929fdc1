"""Training input pipeline: split, batches, normalization, augmentation, streaming, dataset checks."""

from __future__ import annotations

import inspect
import threading
import time

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phenocoder_lib import patches as P
from phenocoder_lib import training as T
from phenocoder_lib.ingest import read_plate


@pytest.fixture(scope="module")
def plate(plate_template):
    return read_plate(plate_template("small", "plate"))


@pytest.fixture(scope="module")
def dataset(plate, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds")
    return P.generate_dataset(plate, dataset="d", dir_dataset=folder, table_key="nuclei_features",
                              sample_key="sample", image_key="IF", patch_size=16)


# --------------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------------


def _index(sizes):
    return pd.DataFrame({
        "dataset": "d",
        "sample": np.repeat([f"s{i}" for i in range(len(sizes))], sizes),
    })


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6).filter(lambda s: sum(s) >= 2),
       fraction=st.floats(0.01, 0.99), seed=st.integers(0, 10))
def test_split_is_never_empty_and_disjoint(sizes, fraction, seed):
    index = _index(sizes)
    train, val = T.split_train_val(index, validation_fraction=fraction, seed=seed)
    assert len(train) > 0 and len(val) > 0
    assert len(np.intersect1d(train, val)) == 0
    assert len(train) + len(val) == len(index)


def test_split_by_object_is_per_sample_seeded_and_near_the_fraction():
    index = _index([100, 50, 10])
    train, val = T.split_train_val(index, validation_fraction=0.2, seed=3)
    counts = index.iloc[val]["sample"].value_counts().to_dict()
    assert counts == {"s0": 20, "s1": 10, "s2": 2}
    again, _ = T.split_train_val(index, validation_fraction=0.2, seed=3)
    np.testing.assert_array_equal(train, again)
    other, _ = T.split_train_val(index, validation_fraction=0.2, seed=4)
    assert not np.array_equal(train, other)


def test_split_groups_interleaved_rows_like_a_per_sample_scan():
    """The split groups rows by (dataset, sample) in one pass (linear in objects, not objects x samples);
    the seeded result is that of the earlier per-sample scan (rows of each group in order, groups in order
    of first appearance), also when the samples' rows are interleaved."""
    rng = np.random.default_rng(0)
    index = pd.DataFrame({"dataset": rng.choice(["a", "b"], 600), "sample": rng.choice(["s2", "s0", "s1"], 600)})
    train, val = T.split_train_val(index, validation_fraction=0.3, seed=5)
    keys = (index["dataset"] + "\x00" + index["sample"]).to_numpy()
    rng_ref = np.random.default_rng([5, 7])
    ref = [rng_ref.choice(np.flatnonzero(keys == k), size=round(0.3 * (keys == k).sum()), replace=False)
           for k in pd.unique(keys)]
    np.testing.assert_array_equal(val, np.sort(np.concatenate(ref)))
    assert len(train) + len(val) == 600


def test_split_by_sample_holds_out_whole_samples():
    index = _index([10, 10, 10, 10, 10])
    train, val = T.split_train_val(index, validation_fraction=0.4, seed=0, split_by="sample")
    train_s, val_s = set(index.iloc[train]["sample"]), set(index.iloc[val]["sample"])
    assert len(val_s) == 2 and len(train_s) == 3 and not train_s & val_s
    with pytest.raises(ValueError, match="at least two samples"):
        T.split_train_val(_index([10]), split_by="sample")


@pytest.mark.parametrize("fraction", [0, 1, 1.5])
def test_split_fraction_is_checked(fraction):
    with pytest.raises(ValueError, match="validation_fraction"):
        T.split_train_val(_index([10]), validation_fraction=fraction)


# --------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------


def test_dihedral_gives_the_eight_distinct_symmetries():
    x = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1)
    outs = [T.dihedral(x, np.array([s]))[0, :, :, 0] for s in range(8)]
    assert len({o.tobytes() for o in outs}) == 8
    np.testing.assert_array_equal(outs[0], x[0, :, :, 0])
    np.testing.assert_array_equal(outs[4], x[0, :, ::-1, 0])
    for o in outs:  # every state is a permutation of the pixels
        np.testing.assert_array_equal(np.sort(o.ravel()), np.arange(9))


# --------------------------------------------------------------------------------------------------
# Batches from the store
# --------------------------------------------------------------------------------------------------


def test_batches_are_the_normalized_stored_patches(dataset):
    data = T.load_patch_data([dataset])
    assert data.in_memory and data.raw.dtype == np.uint8
    pos = np.arange(len(data))
    x = data.batch(pos)
    assert [sample for _, sample in data.stores] == dataset.samples
    for b, sample in enumerate(dataset.samples):  # one block of rows per sample, in store order
        rows = np.arange(data.block_start[b], data.block_start[b + 1])
        assert (data.index["sample"].to_numpy()[rows] == sample).all()
        np.testing.assert_allclose(x[rows], dataset.read(sample), atol=1e-6)
    assert x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1


def test_sequence_order_and_flips_are_seeded_per_epoch(dataset):
    data = T.load_patch_data([dataset])
    pos = np.arange(len(data))
    a = T.PatchSequence(data, pos, batch_size=16, shuffle=True, flip=True, seed=1)
    b = T.PatchSequence(data, pos, batch_size=16, shuffle=True, flip=True, seed=1)
    first = [a[i]["image"] for i in range(len(a))]
    np.testing.assert_array_equal(first[0], b[0]["image"])
    a.on_epoch_end()
    assert not np.array_equal(a[0]["image"], first[0])  # reshuffled
    b.on_epoch_end()
    np.testing.assert_array_equal(a[1]["image"], b[1]["image"])  # ... reproducibly
    assert len(a) == int(np.ceil(len(pos) / 16))
    assert sum(len(a[i]["image"]) for i in range(len(a))) == len(pos)  # no patch dropped
    with pytest.raises(IndexError):
        a[len(a)]


def test_validation_batches_are_plain(dataset):
    data = T.load_patch_data([dataset])
    pos = np.arange(10)
    val = T.PatchSequence(data, pos, batch_size=4, seed=1)
    np.testing.assert_array_equal(val[0]["image"], data.batch(pos[:4]))
    val.on_epoch_end()
    np.testing.assert_array_equal(val[0]["image"], data.batch(pos[:4]))


def test_flip_applies_dihedral_states(dataset):
    data = T.load_patch_data([dataset])
    pos = np.arange(32)
    seq = T.PatchSequence(data, pos, batch_size=32, flip=True, seed=2)
    x, plain = seq[0]["image"], data.batch(pos)
    states = np.random.default_rng([2, 0, 0, 2]).integers(0, 8, size=32)
    np.testing.assert_array_equal(x, T.dihedral(plain, states))
    assert len(set(states.tolist())) > 4


def test_conditions_travel_with_the_batches(dataset):
    cond = np.arange(len(dataset.index) * 2, dtype=np.float32).reshape(-1, 2)
    data = T.load_patch_data([dataset], conditions=cond)
    seq = T.PatchSequence(data, np.arange(len(cond)), batch_size=8, shuffle=True, seed=0)
    b = seq[1]
    order = seq.order[8:16]
    np.testing.assert_array_equal(b["condition"], cond[order])
    np.testing.assert_array_equal(b["image"], data.batch(order))


def test_streaming_from_disk_gives_the_same_patches(dataset):
    mem = T.load_patch_data([dataset])
    disk = T.load_patch_data([dataset], memory_budget_bytes=0)
    assert not disk.in_memory
    disk.chunk_rows = 8  # several chunks per sample (store chunks are larger; reading in sub-chunks is exact)
    pos = np.random.default_rng(0).permutation(len(mem))[:50]
    np.testing.assert_array_equal(disk.batch(pos), mem.batch(pos))
    seq = T.PatchSequence(disk, np.arange(len(disk)), batch_size=10, shuffle=True, seed=0)
    seen = np.concatenate([seq.order[i * 10:(i + 1) * 10] for i in range(len(seq))])
    np.testing.assert_array_equal(np.sort(seen), np.arange(len(disk)))


# --------------------------------------------------------------------------------------------------
# Dataset checks
# --------------------------------------------------------------------------------------------------


def test_patch_size_and_channels_must_match_input_shape(dataset):
    with pytest.raises(ValueError, match=r"input_shape=\(32, 32, 4\) does not match the datasets' patch_size="
                                         r"\(16, 16\); pass input_shape=\(16, 16, 4\)"):
        T.check_datasets([dataset], (32, 32, 4))
    with pytest.raises(ValueError, match=r"input_shape=\(16, 16, 3\) has 3 channels but the datasets have 4"):
        T.check_datasets([dataset], (16, 16, 3))
    assert T.check_datasets([dataset], (16, 16, 4))["patch_size"] == [16, 16]


def test_datasets_with_other_settings_cannot_be_mixed(plate, dataset, tmp_path):
    other = P.generate_dataset(plate, dataset="g", dir_dataset=tmp_path, table_key="nuclei_features",
                               sample_key="sample", image_key="IF", patch_size=16, scale_per_sample=False)
    with pytest.raises(ValueError, match="differ in normalization scale_per_sample"):
        T.check_datasets([dataset, other], (16, 16, 4))


def test_unscaled_integer_patches_are_refused(plate, tmp_path):
    raw = P.generate_dataset(plate, dataset="raw", dir_dataset=tmp_path, table_key="nuclei_features",
                             sample_key="sample", image_key="IF", patch_size=16, scale=False)
    with pytest.raises(ValueError, match="scale=False.*Regenerate it with scale=True"):
        T.load_patch_data([raw])


# --------------------------------------------------------------------------------------------------
# tf.data pipeline (TensorFlow backend)
# --------------------------------------------------------------------------------------------------


def _epoch(batches):
    return [{k: v.numpy() for k, v in b.items()} for b in batches.keras_input()]


def test_tf_dihedral_matches_numpy():
    import tensorflow as tf

    x = np.random.default_rng(0).random((16, 5, 5, 2), dtype=np.float32)
    states = np.arange(16) % 8
    out = T._tf_dihedral(tf.constant(x), tf.constant(states, tf.int32)).numpy()
    np.testing.assert_array_equal(out, T.dihedral(x, states))
    # any dtype (the pipeline flips the raw uint8 patches), a batch size unknown when traced
    raw = np.random.default_rng(2).integers(0, 256, (16, 6, 6, 3), dtype=np.uint8)
    flip = tf.function(T._tf_dihedral, input_signature=[tf.TensorSpec((None, 6, 6, 3), tf.uint8),
                                                        tf.TensorSpec((None,), tf.int32)])
    np.testing.assert_array_equal(flip(raw, states.astype(np.int32)).numpy(), T.dihedral(raw, states))
    # a non-square patch has the 4 symmetries of a rectangle: an odd state acts as the even one below it
    rect = np.random.default_rng(1).random((8, 4, 6, 1), dtype=np.float32)
    even = (np.arange(8) % 8) // 2 * 2
    out = T._tf_dihedral(tf.constant(rect), tf.constant(np.arange(8), tf.int32)).numpy()
    np.testing.assert_array_equal(out, T.dihedral(rect, even))


def test_tf_batches_cover_every_patch_each_epoch_and_reshuffle(dataset):
    cond = np.arange(len(dataset.index), dtype=np.float32)[:, None]
    data = T.load_patch_data([dataset], conditions=cond)
    pos = np.arange(len(data))
    batches = T.make_batches(data, pos, batch_size=16, shuffle=True, flip=True, seed=3)
    assert isinstance(batches, T.TFPatchBatches) and len(batches) == int(np.ceil(len(pos) / 16))
    epochs = [_epoch(batches) for _ in range(2)]
    orders = [np.concatenate([b["condition"][:, 0] for b in e]).astype(int) for e in epochs]
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), pos)  # every patch once per epoch
    assert not np.array_equal(orders[0], orders[1])  # reshuffled every epoch
    plain = data.batch(orders[0][:16])
    images = epochs[0][0]["image"]
    for i in range(16):  # each image is one of the 8 transforms of its patch
        assert any(np.array_equal(images[i], T.dihedral(plain[i:i + 1], np.array([s]))[0]) for s in range(8))
    again = _epoch(T.make_batches(data, pos, batch_size=16, shuffle=True, flip=True, seed=3))
    np.testing.assert_array_equal(again[0]["image"], epochs[0][0]["image"])  # reproducible under the seed


def test_tf_validation_batches_are_plain_and_ordered(dataset):
    data = T.load_patch_data([dataset])
    pos = np.arange(20)
    val = _epoch(T.make_batches(data, pos, batch_size=8, seed=0))
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in val]), data.batch(pos))


# --------------------------------------------------------------------------------------------------
# Memory: bounded chunk cache, streamed batches identical to in-memory ones, compact metadata
# --------------------------------------------------------------------------------------------------


PATCH = 16  # the dataset fixture's patch size
CHUNK = 8  # rows per (sub-)chunk: several chunks per sample on a small plate
CHUNK_BYTES = CHUNK * PATCH * PATCH * 4  # uint8, 4 channels


def _small_chunks(dataset, budget, cond=None):
    """PatchData with small chunks and windows of 2 chunks, so an epoch spans several windows."""
    data = T.load_patch_data([dataset], conditions=cond, memory_budget_bytes=budget)
    data.chunk_rows = CHUNK  # reading sub-chunks of the store is exact; set before the first read
    data.shuffle_window_bytes = 2 * CHUNK_BYTES
    return data


def test_streaming_gives_the_in_memory_batches(dataset):
    """Same seed, same batches (order, values, dihedral draws, conditions), in RAM or streamed through a tiny
    cache; the tf.data pipeline gives the batches of the numpy PatchSequence."""
    cond = np.arange(len(dataset.index), dtype=np.float32)[:, None]
    mem, disk = _small_chunks(dataset, 2**30, cond), _small_chunks(dataset, 5 * CHUNK_BYTES, cond)
    assert mem.in_memory and not disk.in_memory and mem.window_chunks == disk.window_chunks == 2
    pos = np.arange(len(mem))[::2]
    kw = dict(batch_size=8, shuffle=True, flip=True, seed=4)
    a, b = T.make_batches(mem, pos, **kw), T.make_batches(disk, pos, **kw)
    assert isinstance(b, T.TFPatchBatches)
    seq = T.PatchSequence(disk, pos, **kw)
    orders = []
    for _ in range(2):
        ea, eb = _epoch(a), _epoch(b)
        assert len(ea) == len(eb) == len(seq)
        for i, (ba, bb) in enumerate(zip(ea, eb, strict=True)):
            np.testing.assert_array_equal(ba["image"], bb["image"])
            np.testing.assert_array_equal(ba["condition"], bb["condition"])
            ref = seq[i]
            np.testing.assert_allclose(bb["image"], ref["image"], rtol=0, atol=1e-6)
            np.testing.assert_array_equal(bb["condition"], ref["condition"])
        order = np.concatenate([x["condition"][:, 0] for x in eb]).astype(int)
        np.testing.assert_array_equal(np.sort(order), pos)  # every training patch once per epoch
        orders.append(order)
        seq.on_epoch_end()
    assert not np.array_equal(orders[0], orders[1])  # reshuffled every epoch
    assert disk._cache.peak_nbytes <= 5 * CHUNK_BYTES


def test_shuffle_windows_hold_few_chunks_and_a_small_split_is_fully_permuted(dataset):
    data = _small_chunks(dataset, 2**30)
    pos = np.arange(len(data))
    plan = T.batch_plan(data, pos, shuffle=True, seed=0, epoch=0)
    chunk, _ = data.chunk_of(plan.order)
    cuts = np.cumsum([0] + [int(np.isin(chunk, w).sum()) for w in plan.windows])
    for k, w in enumerate(plan.windows):  # rows come window after window, each window from its 2 chunks
        assert len(w) <= 2 and set(chunk[cuts[k]:cuts[k + 1]].tolist()) == set(w.tolist())
    assert cuts[-1] == len(pos) and len(plan.windows) > 2
    again = T.batch_plan(data, pos, shuffle=True, seed=0, epoch=0)
    np.testing.assert_array_equal(plan.order, again.order)
    data.shuffle_window_bytes = 0  # default window (256 MiB): the whole plate in one window
    full = T.batch_plan(data, pos, shuffle=True, seed=0, epoch=0)
    assert len(full.windows) == 1 and not np.array_equal(full.order, pos)
    np.testing.assert_array_equal(np.sort(full.order), pos)
    plain = T.batch_plan(data, pos, shuffle=False, seed=0, epoch=3)
    np.testing.assert_array_equal(plain.order, pos)


def test_streaming_decodes_each_chunk_about_once_per_pass_within_the_budget(dataset):
    budget = 5 * CHUNK_BYTES
    data = _small_chunks(dataset, budget)
    pos = np.arange(len(data))
    n_chunks = len(np.unique(data.chunk_of(pos)[0]))
    batches = T.make_batches(data, pos, batch_size=8, shuffle=True, flip=True, seed=0)
    for _ in range(2):
        _epoch(batches)
    assert data._cache.n_loads <= 2 * n_chunks + 2  # prefetched windows are used, not decoded again
    assert data._cache.nbytes <= data._cache.peak_nbytes <= budget


def test_chunk_cache_never_holds_more_than_its_budget():
    sizes = {k: (k % 5 + 1) * 100 for k in range(40)}
    loaded = []
    seen = []

    def load(key):
        loaded.append(key)
        return np.zeros(sizes[key], np.uint8)

    cache = T._ChunkCache(load, 1000)
    rng = np.random.default_rng(0)
    workers = [threading.Thread(target=lambda s=s: [cache.get(int(k)) for k in np.random.default_rng(s)
                                                      .integers(0, 40, 200)]) for s in range(3)]
    for t in workers:
        t.start()
    for _ in range(50):
        cache.prefetch(rng.integers(0, 40, 5).tolist())
        seen.append(cache.nbytes)
    for t in workers:
        t.join()
    while cache._pending:  # let the background prefetch finish
        time.sleep(0.01)
    assert max(seen) <= 1000 and cache.peak_nbytes <= 1000
    assert cache.nbytes == sum(a.nbytes for a in cache._chunks.values()) <= 1000
    assert cache.get(3) is cache.get(3)  # cached: decoded once
    n = len(loaded)
    small = T._ChunkCache(load, 150)
    small.get(9)  # 500 bytes: returned, never kept
    assert len(small) == 0 and small.nbytes == 0 and len(loaded) == n + 1


def test_metadata_per_object_is_compact(dataset):
    data = T.load_patch_data([dataset])
    index = data.index
    assert "row" not in index and "padded" not in index
    assert str(index["sample"].dtype) == "category" and str(index["dataset"].dtype) == "category"
    assert all(index[c].dtype == np.int32 for c in ("y", "x", "z"))
    per_object = index.memory_usage(deep=True).sum() / len(index)
    assert per_object < 60, per_object  # was about 230 bytes (object strings, int64)
    assert data.block_start.nbytes + data.block_group.nbytes < 100  # per sample, not per object
    assert not hasattr(data, "group") and not hasattr(data, "store_row")


def test_the_facade_uses_the_default_budget(plate, tmp_path, monkeypatch):
    from phenocoder_lib import Phenocoder, model_config

    assert T.DEFAULT_MEMORY_BUDGET == model_config.DEFAULT_MEMORY_BUDGET == 2**30
    assert inspect.signature(Phenocoder.initialize_model).parameters["memory_budget_bytes"].default == 2**30
    budgets = []
    load = T.load_patch_data
    monkeypatch.setattr(T, "load_patch_data", lambda *a, **kw: budgets.append(kw["memory_budget_bytes"]) or
                        load(*a, **kw))
    pheno = Phenocoder(sdata=plate, seed=0)
    pheno.generate_dataset("d", tmp_path, patch_size=PATCH, progress=False)
    pheno.initialize_model(4, 8, [], input_shape=(PATCH, PATCH, 4), conv_layers=(8,), batch_size=16)
    assert budgets == [T.DEFAULT_MEMORY_BUDGET] and pheno.model_config["memory_budget_bytes"] == 2**30
    from phenocoder_assets import configs

    assert configs.ModelConfig().model_kwargs([PATCH, PATCH, 4])["memory_budget_bytes"] == T.DEFAULT_MEMORY_BUDGET


def test_training_with_a_tiny_budget_matches_in_memory_training(dataset, tmp_path):
    from phenocoder_lib import models as M

    histories = []
    for budget in (2**30, 3 * CHUNK_BYTES):
        data = _small_chunks(dataset, budget)
        train, val = T.split_train_val(data.index, seed=0)
        model = M.make_model(input_shape=(PATCH, PATCH, 4), n_latent_dim=4, n_dense_dim=8, conv_layers=(8,),
                             dropout=None, beta=0.01, n_conditions=0, seed=0)
        res = T.fit(model, T.make_batches(data, train, batch_size=16, shuffle=True, flip=True, seed=0),
                    T.make_batches(data, val, batch_size=16, seed=0), model_dir=tmp_path / str(budget),
                    log_dir=None, n_epochs=2, seed=0, verbose=0)
        assert data.in_memory == (budget == 2**30)
        histories.append(res["history"])
    for key in ("loss", "val_loss", "reconstruction_loss", "kl_loss"):
        np.testing.assert_allclose(histories[0][key], histories[1][key], rtol=1e-5, err_msg=key)


def test_thread_pools_follow_the_process_cores_and_the_environment():
    """Importing ``models`` sizes TensorFlow's pools to the affinity mask; the TF_NUM_* variables win."""
    import subprocess
    import sys

    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]});"
            "import phenocoder_lib.models; from phenocoder_lib.training import configure_tensorflow;"
            "s = configure_tensorflow(); print(s['intra_op_threads'], s['inter_op_threads'], s['jit_compile'])")
    env = {**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TF_NUM_INTRAOP_THREADS", None)
    env.pop("TF_NUM_INTEROP_THREADS", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", "1", "auto"]
    env["TF_NUM_INTEROP_THREADS"] = "3"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", "3", "auto"]


def test_model_trains_under_a_bfloat16_policy_with_a_float32_loss():
    """Opt-in mixed precision: bfloat16 layers, float32 loss close to the float32 model's."""
    import keras

    from phenocoder_lib.models import make_model

    rng = np.random.default_rng(0)
    x = rng.random((32, 16, 16, 2)).astype(np.float32)
    c = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 32)]
    losses = {}
    try:
        for policy in ("mixed_bfloat16", "float32"):
            keras.mixed_precision.set_global_policy(policy)
            model = make_model(input_shape=(16, 16, 2), n_latent_dim=4, n_dense_dim=8, conv_layers=(4, 8),
                               dropout=None, beta=0.01, n_conditions=3, seed=1)
            out = model({"image": x, "condition": c})
            assert keras.backend.standardize_dtype(out["logits"].dtype) == policy.replace("mixed_", "")
            loss = model.compute_loss(x={"image": x, "condition": c}, y_pred=out)
            assert keras.backend.standardize_dtype(loss.dtype) == "float32"
            losses[policy] = float(loss)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    # same seeded weights, same sampling noise: only the bfloat16 rounding differs
    assert np.isfinite(losses["mixed_bfloat16"]) and losses["mixed_bfloat16"] == pytest.approx(losses["float32"],
                                                                                                rel=0.02)


# --------------------------------------------------------------------------------------------------
# Throughput settings: in-graph gather, steps per execution, mixed precision
# --------------------------------------------------------------------------------------------------


def test_in_graph_batches_are_the_numpy_gathered_batches_and_share_the_patch_memory(dataset):
    """In RAM the batches are gathered inside tf.data from a tensor on the patch array's own memory; they
    equal the batches gathered per batch in numpy (order, values, flips, conditions), epoch after epoch."""
    cond = np.arange(len(dataset.index), dtype=np.float32)[:, None]
    data = T.load_patch_data([dataset], conditions=cond)
    pos = np.arange(len(data))[1::2]
    kw = dict(batch_size=8, shuffle=True, flip=True, seed=6)
    graph, numpy_ = T.make_batches(data, pos, in_graph=None, **kw), T.make_batches(data, pos, in_graph=False, **kw)
    assert graph.in_graph and not numpy_.in_graph
    for _ in range(2):
        eg, en = _epoch(graph), _epoch(numpy_)
        assert len(eg) == len(en) == len(graph)
        for bg, bn in zip(eg, en, strict=True):
            np.testing.assert_array_equal(bg["image"], bn["image"])
            np.testing.assert_array_equal(bg["condition"], bn["condition"])
    tensor = data.raw_tensor()
    assert data.raw.ctypes.data % 64 == 0 and tensor.shape == data.raw.shape
    old = int(data.raw[0, 0, 0, 0])
    try:
        data.raw[0, 0, 0, 0] = old ^ 0xFF
        assert int(tensor[0, 0, 0, 0]) == old ^ 0xFF  # the same memory: the patches are held once
    finally:
        data.raw[0, 0, 0, 0] = old
    streamed = _small_chunks(dataset, 5 * CHUNK_BYTES)
    assert not T.make_batches(streamed, pos, **kw).in_graph
    with pytest.raises(ValueError, match="in_graph=True needs the patches in RAM"):
        T.make_batches(streamed, pos, in_graph=True, **kw)


def test_steps_per_execution_gives_the_same_losses(dataset):
    import keras

    from phenocoder_lib import models as M

    data = T.load_patch_data([dataset])
    train, val = T.split_train_val(data.index, seed=0)
    n_batches = len(T.make_batches(data, train, batch_size=6))
    assert T.STEPS_PER_EXECUTION == 8 and n_batches % 8  # the last execution of an epoch is partial
    histories = []
    for spe in (1, T.STEPS_PER_EXECUTION):
        keras.utils.set_random_seed(0)
        model = M.make_model(input_shape=(PATCH, PATCH, 4), n_latent_dim=4, n_dense_dim=8, conv_layers=(8,),
                             dropout=0.1, beta=0.01, n_conditions=0, seed=0)
        T.compile_model(model, 1e-3, steps_per_execution=spe)
        assert model.steps_per_execution == spe
        hist = model.fit(T.make_batches(data, train, batch_size=6, shuffle=True, flip=True, seed=0).keras_input(),
                         validation_data=T.make_batches(data, val, batch_size=6, seed=0).keras_input(),
                         epochs=2, verbose=0, shuffle=False)
        histories.append(hist.history)
    for key in ("loss", "val_loss", "reconstruction_loss", "kl_loss"):
        np.testing.assert_allclose(histories[0][key], histories[1][key], rtol=1e-5, err_msg=key)


def test_mixed_precision_follows_the_hardware_and_the_environment(monkeypatch):
    import tensorflow as tf

    gpu = bool(tf.config.list_physical_devices("GPU"))
    monkeypatch.delenv(T.MIXED_PRECISION_ENV, raising=False)
    monkeypatch.setattr(T, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    # by default mixed precision only on a GPU: bfloat16 raised the real plate's 10-epoch loss on a CPU
    assert T.mixed_precision_policy() == ("mixed_float16" if gpu else "float32")
    monkeypatch.setenv(T.MIXED_PRECISION_ENV, "1")  # the hardware's mixed precision, on a CPU too
    assert T.mixed_precision_policy() == ("mixed_float16" if gpu else "mixed_bfloat16")
    monkeypatch.setattr(T, "cpu_flags", lambda: {"avx512f", "avx2"})
    assert T.mixed_precision_policy() == ("mixed_float16" if gpu else "float32")
    for value, policy in (("0", "float32"), ("off", "float32"), ("bfloat16", "mixed_bfloat16"),
                          ("mixed_float16", "mixed_float16")):
        monkeypatch.setenv(T.MIXED_PRECISION_ENV, value)
        assert T.mixed_precision_policy() == policy
    monkeypatch.setenv(T.MIXED_PRECISION_ENV, "half")
    with pytest.raises(ValueError, match="PHENOCODER_MIXED_PRECISION='half' is not valid"):
        T.mixed_precision_policy()
    monkeypatch.undo()
    with open("/proc/cpuinfo") as fh:  # the flags of the first CPU listed
        flags = set(next(line for line in fh if line.startswith("flags")).partition(":")[2].split())
    assert T.cpu_flags() == flags


def test_the_dtype_policy_scope_restores_the_global_policy():
    import keras

    before = keras.config.dtype_policy().name
    with T.dtype_policy("mixed_bfloat16"):
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
        layer = keras.layers.Dense(2)
    assert keras.config.dtype_policy().name == before and layer.dtype_policy.name == "mixed_bfloat16"


@pytest.mark.parametrize("policy", ["bfloat16", "float16", "0"])
def test_a_mixed_precision_training_saves_and_returns_a_float32_model(dataset, tmp_path, monkeypatch, policy):
    """Trained under mixed_bfloat16, mixed_float16 (the GPU policy: loss scaling, the learning-rate callbacks)
    or float32 (the variable at 0), the model folder holds a float32 model with the trained weights: loaded
    in a fresh call it gives the returned model's latents exactly."""
    import keras

    from phenocoder_lib.model_config import ModelSettings

    monkeypatch.setenv(T.MIXED_PRECISION_ENV, policy)
    settings = ModelSettings(n_latent_dim=4, n_dense_dim=8, conditions=[], input_shape=(PATCH, PATCH, 4),
                             conv_layers=(8,), batch_size=16, seed=0)
    run = T.prepare([dataset], tmp_path / "m", settings)
    expected = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16", "0": "float32"}[policy]
    assert run.model.dtype_policy.name == expected
    run = T.train([dataset], tmp_path / "m", None, start=run, n_epochs=2, plot=False, verbose=0)
    assert run.config["training"]["dtype_policy"] == expected
    assert np.isfinite(run.history["val_loss"]).all()
    loaded = T.load_model(tmp_path / "m")
    checkpoint = keras.saving.load_model(tmp_path / "m" / "checkpoint.keras", safe_mode=True, compile=False)
    for model in (run.model, loaded.model, checkpoint):
        assert model.dtype_policy.name == "float32"
        assert all(layer.dtype_policy.name == "float32" for part in (model.encoder, model.decoder)
                   for layer in part.layers)
    for a, b in zip(run.model.get_weights(), loaded.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    data = T.load_patch_data([dataset])
    pos = np.arange(len(data))
    z = T.predict_z_mean(run.model, data, pos)
    np.testing.assert_array_equal(z, T.predict_z_mean(loaded.model, data, pos))
    np.testing.assert_array_equal(z, T.predict_z_mean(loaded.model, data, pos))  # deterministic
