"""The HBM traffic estimate against a hand count on a small optimized-HLO text: a fusion reads its operands and
writes its result, a fusion that only slices an operand reads the slice, an in-place cache write touches only what
it writes, a loop body is counted per trip."""

from l4jax.plan import traffic

HLO = """
HloModule m

%fused_slice (p0: bf16[16,64,32], p1: s32[]) -> bf16[1,64,32] {
  %p0 = bf16[16,64,32]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %c = s32[] constant(0)
  ROOT %ds = bf16[1,64,32]{2,1,0} dynamic-slice(%p0, %p1, %c, %c), dynamic_slice_sizes={1,64,32}
}

%fused_write (p0: bf16[4,128,8], p1: bf16[4,1,8], p2: s32[]) -> bf16[4,128,8] {
  %p0 = bf16[4,128,8]{2,1,0} parameter(0)
  %p1 = bf16[4,1,8]{2,1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %c = s32[] constant(0)
  ROOT %dus = bf16[4,128,8]{2,1,0} dynamic-update-slice(%p0, %p1, %c, %p2, %c)
}

%body (t: (s32[], f32[256,256], bf16[4,128,8])) -> (s32[], f32[256,256], bf16[4,128,8]) {
  %t = (s32[], f32[256,256]{1,0}, bf16[4,128,8]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[256,256]{1,0} get-tuple-element(%t), index=1
  %kv = bf16[4,128,8]{2,1,0} get-tuple-element(%t), index=2
  %y = f32[256,256]{1,0} fusion(%x, %x), kind=kLoop, calls=%fused_add
  %new = bf16[4,1,8]{2,1,0} fusion(%y), kind=kLoop, calls=%fused_small
  %kv2 = bf16[4,128,8]{2,1,0} fusion(%kv, %new, %i), kind=kLoop, calls=%fused_write
  ROOT %out = (s32[], f32[256,256]{1,0}, bf16[4,128,8]{2,1,0}) tuple(%i, %y, %kv2)
}

ENTRY %main (w: bf16[16,64,32], e: s32[], x: f32[256,256], kv: bf16[4,128,8]) -> bf16[1,64,32] {
  %w = bf16[16,64,32]{2,1,0} parameter(0)
  %e = s32[] parameter(1)
  %x = f32[256,256]{1,0} parameter(2)
  %kv = bf16[4,128,8]{2,1,0} parameter(3)
  %one = bf16[1,64,32]{2,1,0} fusion(%w, %e), kind=kLoop, calls=%fused_slice
  %c = s32[] constant(0)
  %init = (s32[], f32[256,256]{1,0}, bf16[4,128,8]{2,1,0}) tuple(%c, %x, %kv)
  %loop = (s32[], f32[256,256]{1,0}, bf16[4,128,8]{2,1,0}) while(%init), condition=%cond, body=%body
  ROOT %copy = bf16[1,64,32]{2,1,0} copy(%one)
}
"""


def test_traffic_by_hand():
    one_expert = 64 * 32 * 2
    # ENTRY: the slicing fusion reads one expert (not all 16) + 4 bytes of index and writes it; the copy reads and
    # writes it again; the while loop itself is not a kernel.
    assert traffic.traffic(HLO) == (one_expert + 4 + one_expert) + 2 * one_expert
    assert traffic.loop_body(HLO) == "body"
    # One trip: the add reads x twice and writes y (3 x 256 KiB); the small fusion reads y and writes 64 bytes; the
    # cache write touches the new entry and the index, not the 8 KiB cache.
    assert traffic.traffic(HLO, "body") == 3 * 256 * 256 * 4 + (256 * 256 * 4 + 4 * 8 * 2) + (4 * 8 * 2 + 4)
    assert traffic.shape_bytes("(s32[], bf16[2,3]{1,0})") == 4 + 12
