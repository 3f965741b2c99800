"""The decodes' carried K/V buffer (engine/decode_kv.py): which rows it keeps, gathers and writes."""

import torch

from shoal.engine.decode_kv import DecodeKVBuffer

HKV, BLOCK = 2, 4


def make_buffer(max_bytes: int = 1 << 24) -> DecodeKVBuffer:
    return DecodeKVBuffer(num_layers=2, num_kv_heads=HKV, head_dim=8, block_size=BLOCK, dtype=torch.float32,
                          device=torch.device("cpu"), max_bytes=max_bytes)


def test_a_request_joining_the_batch_gathers_only_its_own_row():
    buf = make_buffer()
    first = buf.plan(["a", "b", "c"], [5, 6, 7], kv_version=0)
    assert first.rebuild and first.rows == [0, 1, 2] and first.fills == [0, 1, 2]
    buf.plan(["a", "b"], [6, 7], kv_version=0)  # c leaves
    joined = buf.plan(["a", "b", "d"], [7, 8, 3], kv_version=0)
    assert not joined.rebuild and joined.rows == [0, 1, 2] and joined.fills == [2]
    cap = joined.capacity
    # the new token of row r, head h goes to (r * HKV + h) * capacity + context_len - 1
    want = [(r * HKV + h) * cap + n - 1 for r, n in enumerate([7, 8, 3]) for h in range(HKV)]
    assert joined.write_index.tolist() == want


def test_a_batch_outgrowing_its_rows_doubles_them_once():
    buf = make_buffer()
    buf.plan(["a", "b"], [5, 6], kv_version=0)
    grown = buf.plan(["a", "b", "c"], [6, 7, 3], kv_version=0)
    assert grown.rebuild and grown.buffers[0].shape[1] == 4
    assert not buf.plan(["a", "b", "c", "d"], [7, 8, 4, 3], kv_version=0).rebuild


def test_a_request_leaving_frees_its_row_and_the_rows_stay_packed():
    buf = make_buffer()
    buf.plan(["a", "b", "c"], [5, 6, 7], kv_version=0)
    left = buf.plan(["b", "c"], [7, 8], kv_version=0)  # a left row 0; c's row 2 is past the batch's end
    assert not left.rebuild and left.rows == [1, 0] and left.fills == [1]
    again = buf.plan(["b", "c"], [8, 9], kv_version=0)
    assert again.rows == [1, 0] and again.fills == []


def test_a_skipped_step_a_foreign_write_or_outgrowing_the_rows_regathers():
    buf = make_buffer()
    buf.plan(["a", "b"], [5, 6], kv_version=0)
    skipped = buf.plan(["a", "b"], [6, 8], kv_version=0)  # b ran a multi-token chunk in between
    assert not skipped.rebuild and skipped.fills == [1]
    assert buf.plan(["a", "b"], [7, 9], kv_version=1).rebuild  # the cache was written from outside
    long = 10 * BLOCK
    grown = buf.plan(["a", "b"], [8, long], kv_version=1)
    assert grown.rebuild and grown.capacity >= long and grown.fills == [0, 1]


def test_too_big_a_buffer_is_refused_and_gathering_resumes_cleanly():
    buf = make_buffer(max_bytes=2 * 2 * HKV * 8 * 8 * 4)  # 2 layers x K/V x heads x 8 tokens x 8 dims x fp32
    assert buf.plan(["a"], [100], kv_version=0) is None
    assert buf.plan(["a"], [101], kv_version=0) is None
    small = buf.plan(["b"], [2], kv_version=0)
    assert small is None or (small.rebuild and small.fills == [0])


def test_a_request_sitting_a_step_out_comes_back_to_its_row():
    buf = make_buffer()
    buf.plan(["a", "b", "c"], [5, 6, 7], kv_version=0)
    alone = buf.plan(["c"], [8], kv_version=0)  # a and b wait a step (another tenant's first-token step)
    assert alone.rows == [0] and alone.fills == [0]  # c moves into row 0, over a's
    back = buf.plan(["a", "b", "c"], [6, 7, 9], kv_version=0)
    assert not back.rebuild and back.rows == [2, 1, 0] and back.fills == [0]  # b back in row 1, as it was


def test_a_float32_interlude_leaves_the_other_dtypes_rows_in_place():
    buf = make_buffer()
    buf.plan(["a", "b", "c"], [5, 6, 7], kv_version=0)
    small = buf.plan(["c"], [8], kv_version=0, dtype=torch.float64)
    assert small.rebuild and small.buffers[0].dtype == torch.float64
    back = buf.plan(["a", "b", "c"], [6, 7, 9], kv_version=0)
    assert back.buffers[0].dtype == torch.float32 and not back.rebuild
    assert back.fills == [2]  # a and b still in their rows; c's went stale while it decoded in float64
