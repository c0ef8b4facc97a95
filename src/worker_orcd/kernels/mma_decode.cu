// Decode-sized GEMMs on mma.sync (sm_80+), the weights decoded straight into tensor-core A fragments: GPT-OSS's MoE
// (MXFP4 experts: moe_gate_up, moe_down; kernels/cuda_moe.py) and dense Q8_0 matrices (q8_gemm; kernels/
// cuda_dense.py). Compiled at run time by NVRTC (kernels/nvrtc.py); no headers.
//
// The layout read is quant/packed.py's MXFP4 with row groups of 64: codes u32 [rows/64, K/32, 64, 4] (word i of
// a block holds elements 8i..8i+7; slot s of half h holds element 8i + 2s + h), exponents u8 [rows, K/32].
// One mma.m16n8k16 multiplies 16 weight rows by 8 pairs (the columns) over 16 of K. Thread (g = lane / 4,
// t = lane % 4) decodes word t of rows g and g + 8 of a block: four f16 pairs, elements 8t + 2s and 8t + 2s + 1,
// which are exactly the pairs an A fragment register holds. The mma's k order is a fixed permutation of the
// block's 32 elements, the same for the x (B) fragments: 16 bytes of x a thread, elements 8t..8t+7 of the
// pair column g. A block's two mmas start from zero, and the block's scale multiplies that sum in float32.
// Each column (pair) of an mma is computed apart from the others, and every row's blocks are added in one fixed
// order (a warp's run of blocks, then the CTA's KS runs in order): a pair's result never depends on the batch.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define DEV __device__ __forceinline__

DEV void pdl_enter() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory");
#endif
}

DEV u32 ld_stream(const u32* p) {  // weights: read once, keep them out of L1
  u32 v;
  asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

DEV u32 ld_byte(const u8* p) {
  u32 v;
  asm("ld.global.nc.u8 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

DEV void ld_x(u32 (&v)[4], const u16* p) {
  asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]) : "l"(p));
}

DEV float as_float(u32 u) {
  float f;
  asm("mov.b32 %0, %1;" : "=f"(f) : "r"(u));
  return f;
}

// One word -> its four f16 pairs (E2M1 value * 2^-14): slot s's magnitude bits to 9..11, its sign to 15.
DEV void decode(u32 w, u32 (&p)[4]) {
  p[0] = (w << 9) & 0x8E008E00u;
  p[1] = (w << 6) & 0x8E008E00u;
  p[2] = ((w >> 1) & 0x0E000E00u) | ((w << 8) & 0x80008000u);
  p[3] = ((w >> 4) & 0x0E000E00u) | ((w << 7) & 0x80008000u);
}

// d = A . B over one block of 32: a thread's decoded pairs of rows g (lo) and g + 8 (hi), x pairs b.
DEV void block_mma(float (&d)[4], const u32 (&lo)[4], const u32 (&hi)[4], const u32 (&b)[4]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %10, %10, %10};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(lo[0]), "r"(hi[0]), "r"(lo[1]), "r"(hi[1]), "r"(b[0]), "r"(b[1]), "f"(0.0f));
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(lo[2]), "r"(hi[2]), "r"(lo[3]), "r"(hi[3]), "r"(b[2]), "r"(b[3]));
}

// PD blocks of loads: each matrix's words of rows g and g + 8, their exponents, and x for the nt columns.
template <int NM, int PD>
struct Stage {
  u32 wl[PD][NM], wh[PD][NM], sl[PD][NM], sh[PD][NM], xv[PD][2][4];
};

// Issue the loads of blocks [0, min(n, PD)) past the pointers (n: blocks left in the run), then move the
// pointers PD blocks on.
template <int NM, int PD>
DEV void load_stage(Stage<NM, PD>& st, const u32* (&w)[NM], const u8* (&s)[NM], const u16* (&x)[2], int nblk,
                    int n, int nt) {
#pragma unroll
  for (int i = 0; i < PD; i++) {
    if (i < n) {
#pragma unroll
      for (int m = 0; m < NM; m++) {
        st.wl[i][m] = ld_stream(w[m] + i * 256);
        st.wh[i][m] = ld_stream(w[m] + i * 256 + 32);
        st.sl[i][m] = ld_byte(s[m] + i);
        st.sh[i][m] = ld_byte(s[m] + 8 * nblk + i);
      }
      ld_x(st.xv[i][0], x[0] + i * 32);
      if (nt > 1) ld_x(st.xv[i][1], x[1] + i * 32);
    }
  }
#pragma unroll
  for (int m = 0; m < NM; m++) {
    w[m] += PD * 256;
    s[m] += PD;
  }
  x[0] += PD * 32;
  x[1] += PD * 32;
}

// acc[m][q] += the stage's first n blocks (two mmas from zero a block, times the block's scale in float32).
template <int NM, int PD, int NT>
DEV void mma_stage(float (&acc)[NM][2][4], const Stage<NM, PD>& st, int n) {
#pragma unroll
  for (int i = 0; i < PD; i++) {
    if (i < n) {
#pragma unroll
      for (int m = 0; m < NM; m++) {
        u32 lo[4], hi[4];
        decode(st.wl[i][m], lo);
        decode(st.wh[i][m], hi);
        const float fl = as_float(st.sl[i][m] << 23), fh = as_float(st.sh[i][m] << 23);  // 2^(e-127); e = 0: 0
#pragma unroll
        for (int q = 0; q < NT; q++) {
          float d[4];
          block_mma(d, lo, hi, st.xv[i][q]);
          acc[m][q][0] += fl * d[0];
          acc[m][q][1] += fl * d[1];
          acc[m][q][2] += fh * d[2];
          acc[m][q][3] += fh * d[3];
        }
      }
    }
  }
}

// acc[m][q][c] over blocks [b_lo, b_hi) of NM matrices (gate and up, or down) for this warp's 16 rows and the
// tile's nt (1 or 2) columns of 8 pairs. w[m]: word `lane` of the rows' block 0; s[m]: row g's exponents;
// x[q]: the row of x column g of q reads (any valid row where the column is padding: its result is dropped).
// Two stages of PD blocks alternate: one is multiplied while the other's loads are in flight.
template <int NM, int PD, int NT>
DEV void expert_dot_nt(float (&acc)[NM][2][4], const u32* const (&w0)[NM], const u8* const (&s0)[NM], int nblk,
                       const u16* const (&x0)[2], int b_lo, int b_hi, int t) {
#pragma unroll
  for (int m = 0; m < NM; m++)
#pragma unroll
    for (int q = 0; q < 2; q++)
#pragma unroll
      for (int c = 0; c < 4; c++) acc[m][q][c] = 0.0f;
  const u32* w[NM];
  const u8* s[NM];
#pragma unroll
  for (int m = 0; m < NM; m++) {
    w[m] = w0[m] + b_lo * 256;
    s[m] = s0[m] + b_lo;
  }
  const u16* x[2] = {x0[0] + b_lo * 32 + 8 * t, x0[1] + b_lo * 32 + 8 * t};
  Stage<NM, PD> a, b;
  load_stage(a, w, s, x, nblk, b_hi - b_lo, NT);
  for (int k = b_lo; k < b_hi; k += 2 * PD) {
    load_stage(b, w, s, x, nblk, b_hi - k - PD, NT);
    mma_stage<NM, PD, NT>(acc, a, b_hi - k);
    load_stage(a, w, s, x, nblk, b_hi - k - 2 * PD, NT);
    mma_stage<NM, PD, NT>(acc, b, b_hi - k - PD);
  }
}

// The KS warps of an m16 tile hold sums over consecutive runs of blocks: warp ks = 0 adds the others' in order.
template <int NM, int RT, int KS>
DEV void sum_splits(float (&acc)[NM][2][4], float* red, int j, int ks, int lane) {
  if (KS == 1) return;
  constexpr int N = NM * 8;
  if (ks > 0) {
    float* r = red + (((ks - 1) * RT + j) * 32 + lane) * N;
#pragma unroll
    for (int m = 0; m < NM; m++)
#pragma unroll
      for (int q = 0; q < 2; q++)
#pragma unroll
        for (int c = 0; c < 4; c++) r[(m * 2 + q) * 4 + c] = acc[m][q][c];
  }
  __syncthreads();
  if (ks == 0) {
#pragma unroll
    for (int k = 1; k < KS; k++) {
      const float* r = red + (((k - 1) * RT + j) * 32 + lane) * N;
#pragma unroll
      for (int m = 0; m < NM; m++)
#pragma unroll
        for (int q = 0; q < 2; q++)
#pragma unroll
          for (int c = 0; c < 4; c++) acc[m][q][c] += r[(m * 2 + q) * 4 + c];
    }
  }
}

DEV u16 to_half(float f) {
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

DEV float sigmoid(float v) {
  float e;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(-v * 1.4426950408889634f));
  return 1.0f / (1.0f + e);
}

constexpr int PAIRS = 16;            // pairs a tile (route_tiles' group): two columns of 8
constexpr float DECODED = 16384.0f;  // the decoded f16 codes are E2M1 * 2^-14

// The pairs of a CTA's mma columns, read before anything else (they and the expert arrive together).
// Tiles (DIRECT false): tile blockIdx.y of route_tiles (pairs of one expert, -1 padding), expert tile_e[tile].
// DIRECT: one pair a CTA, p = blockIdx.y in column 0, expert ids[p] (no routing launch; a pair's sums are the
// same bits in any column of any tile). at[q]: column 8q + g's pair (x); out[q][c]: column 8q + 2t + c's.
template <int NT, bool DIRECT>
struct Cols {
  int e, first, at[NT], out[NT][2];
  DEV Cols(const int* pairs, const void* route, int g, int t) {
    const int y = blockIdx.y;
    if (DIRECT) {
      e = (int)((const long long*)route)[y];
      first = y;
#pragma unroll
      for (int q = 0; q < NT; q++) {
        at[q] = q == 0 && g == 0 ? y : -1;
        out[q][0] = q == 0 && t == 0 ? y : -1;
        out[q][1] = -1;
      }
    } else {
      const int* tp = pairs + y * PAIRS;
      e = ((const int*)route)[y];
      first = tp[0];
#pragma unroll
      for (int q = 0; q < NT; q++) {
        at[q] = tp[8 * q + g];
        out[q][0] = tp[8 * q + 2 * t];
        out[q][1] = tp[8 * q + 2 * t + 1];
      }
    }
  }
};

// h[p, f] = clamped SwiGLU of gate and up rows f of expert e on token p / k_slots (f16 x, f16 h).
// Grid (F / (16 RT), tiles or pairs); RT * KS warps: m16 tile j = warp % RT, run of blocks ks = warp / RT.
template <int RT, int KS, int PD, int MINB, int NT, bool DIRECT>
__global__ void __launch_bounds__(RT * KS * 32, MINB) moe_gate_up(
    const u16* __restrict__ x, const int* __restrict__ pairs, const void* __restrict__ route, const u32* gw,
    const u8* gs, const float* __restrict__ gb, const u32* uw, const u8* us, const float* __restrict__ ub,
    u16* __restrict__ h, int E, int F, int D, int k_slots, float limit, float alpha) {
  __shared__ float red[(KS > 1 ? KS - 1 : 1) * RT * 32 * 16];
  pdl_enter();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, j = warp % RT, ks = warp / RT;
  const int g = lane >> 2, t = lane & 3;
  const Cols<NT, DIRECT> col(pairs, route, g, t);
  if (col.e >= E) return;
  const int nblk = D / 32;
  const int f0 = blockIdx.x * 16 * RT + 16 * j;  // the warp's first row within the expert
  const int row = col.e * F + f0;                 // ... and among all experts' rows (a multiple of 16)
  const long long word0 = (long long)(row >> 6) * nblk * 256 + (row & 63) * 4 + lane;
  const u32* const w[2] = {gw + word0, uw + word0};
  const long long s0 = (long long)(row + g) * nblk;
  const u8* const s[2] = {gs + s0, us + s0};
  const float bias[2][2] = {{gb[row + g], gb[row + g + 8]}, {ub[row + g], ub[row + g + 8]}};
  const u16* xs[2];
#pragma unroll
  for (int q = 0; q < 2; q++) {
    const int p = q < NT ? col.at[q] : -1;
    xs[q] = x + (long long)((p >= 0 ? p : col.first) / k_slots) * D;
  }
  const int per = (nblk + KS - 1) / KS;
  const int b_lo = ks * per, b_hi = min(nblk, b_lo + per);
  float acc[2][2][4];
  expert_dot_nt<2, PD, NT>(acc, w, s, nblk, xs, b_lo, b_hi, t);
  sum_splits<2, RT, KS>(acc, red, j, ks, lane);
  if (ks != 0) return;
#pragma unroll
  for (int q = 0; q < NT; q++)
#pragma unroll
    for (int c = 0; c < 4; c++) {
      const int p = col.out[q][c & 1];
      if (p < 0) continue;
      const int hr = c >> 1;
      const float gv = fminf(acc[0][q][c] * DECODED + bias[0][hr], limit);
      const float uv = fminf(fmaxf(acc[1][q][c] * DECODED + bias[1][hr], -limit), limit);
      h[(long long)p * F + f0 + g + 8 * hr] = to_half((uv + 1.0f) * gv * sigmoid(alpha * gv));
    }
}

// part[p, d] = w[p] * (down rows d of expert e . h[p] + bias) (float32; the k partial rows a token are summed by
// the consumer, in order).
template <int RT, int KS, int PD, int MINB, int NT, bool DIRECT>
__global__ void __launch_bounds__(RT * KS * 32, MINB) moe_down(
    const u16* __restrict__ hx, const int* __restrict__ pairs, const void* __restrict__ route,
    const float* __restrict__ route_w, const u32* dw, const u8* ds, const float* __restrict__ db,
    float* __restrict__ part, int E, int F, int D) {
  __shared__ float red[(KS > 1 ? KS - 1 : 1) * RT * 32 * 8];
  pdl_enter();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, j = warp % RT, ks = warp / RT;
  const int g = lane >> 2, t = lane & 3;
  const Cols<NT, DIRECT> col(pairs, route, g, t);
  if (col.e >= E) return;
  const int nblk = F / 32;
  const int d0 = blockIdx.x * 16 * RT + 16 * j;
  const int row = col.e * D + d0;
  const long long word0 = (long long)(row >> 6) * nblk * 256 + (row & 63) * 4 + lane;
  const u32* const w[1] = {dw + word0};
  const u8* const s[1] = {ds + (long long)(row + g) * nblk};
  const float bias[2] = {db[row + g], db[row + g + 8]};
  float rw[NT][2];
#pragma unroll
  for (int q = 0; q < NT; q++)
#pragma unroll
    for (int c = 0; c < 2; c++) rw[q][c] = col.out[q][c] >= 0 ? route_w[col.out[q][c]] : 0.0f;
  const u16* xs[2];
#pragma unroll
  for (int q = 0; q < 2; q++) {
    const int p = q < NT ? col.at[q] : -1;
    xs[q] = hx + (long long)(p >= 0 ? p : col.first) * F;
  }
  const int per = (nblk + KS - 1) / KS;
  const int b_lo = ks * per, b_hi = min(nblk, b_lo + per);
  float acc[1][2][4];
  expert_dot_nt<1, PD, NT>(acc, w, s, nblk, xs, b_lo, b_hi, t);
  sum_splits<1, RT, KS>(acc, red, j, ks, lane);
  if (ks != 0) return;
#pragma unroll
  for (int q = 0; q < NT; q++)
#pragma unroll
    for (int c = 0; c < 4; c++) {
      const int p = col.out[q][c & 1];
      if (p < 0) continue;
      const int hr = c >> 1;
      part[(long long)p * D + d0 + g + 8 * hr] = (acc[0][q][c] * DECODED + bias[hr]) * rw[q][c & 1];
    }
}

// ---------------------------------------------------------------- dense Q8_0 (decode-sized batches)
// quant/packed.py's Q8_0: codes u32 [N, K/4] row by row (word i of a block holds elements 4i..4i+3, byte b element
// 4i + (0, 2, 1, 3)[b]), scales f16 [N, K/32]. Thread (g, t) reads words 2t and 2t + 1 of a block (elements
// 8t..8t+7) of rows g and g + 8: bytes 0 and 2 of a word, then 1 and 3, are an f16 pair by one mask (value + 1152),
// exactly the pairs of an A fragment, and x is read as for the MoE: 16 bytes a thread, elements 8t..8t+7.

DEV u32 ld_u16(const u16* p) {
  u32 v;
  asm("ld.global.nc.u16 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

DEV void ld_w2(u32& a, u32& b, const u32* p) {
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(a), "=r"(b) : "l"(p));
}

DEV u32 q8_pair(u32 w) {  // bytes 0 and 2 of w (int8) -> an f16 pair of their values
  u32 h = (w & 0x00FF00FFu) ^ 0x64806480u, r;
  asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(h), "r"(0x64806480u));
  return r;
}

DEV float f16_to_float(u32 h) {
  float f;
  asm("{ .reg .f16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"((u16)h));
  return f;
}

DEV u32 bf16x2_to_f16x2(u32 v) {  // saturated to f16's finite range, as the Triton tiles read bf16 x
  u32 r;
  asm("{ .reg .f32 lo, hi; mov.b32 lo, %2; mov.b32 hi, %3; cvt.rn.satfinite.f16x2.f32 %0, hi, lo; }"
      : "=r"(r)
      : "r"(v), "r"(v << 16), "r"(v & 0xFFFF0000u));
  return r;
}

template <int PD, int NT>
struct Q8Stage {
  u32 w[PD][4], s[PD][2], xv[PD][NT][4];  // w: row g's words 2t, 2t + 1, then row g + 8's
};

template <int PD, int NT>
DEV void q8_load(Q8Stage<PD, NT>& st, const u32* (&w)[2], const u16* (&s)[2], const u16* (&x)[NT], int n) {
#pragma unroll
  for (int i = 0; i < PD; i++) {
    if (i < n) {
      ld_w2(st.w[i][0], st.w[i][1], w[0] + i * 8);
      ld_w2(st.w[i][2], st.w[i][3], w[1] + i * 8);
      st.s[i][0] = ld_u16(s[0] + i);
      st.s[i][1] = ld_u16(s[1] + i);
#pragma unroll
      for (int q = 0; q < NT; q++) ld_x(st.xv[i][q], x[q] + i * 32);
    }
  }
  w[0] += PD * 8;
  w[1] += PD * 8;
  s[0] += PD;
  s[1] += PD;
#pragma unroll
  for (int q = 0; q < NT; q++) x[q] += PD * 32;
}

template <int PD, int NT, bool XBF>
DEV void q8_mma(float (&acc)[NT][4], const Q8Stage<PD, NT>& st, int n) {
#pragma unroll
  for (int i = 0; i < PD; i++) {
    if (i < n) {
      u32 a[4], b[4];
#pragma unroll
      for (int v = 0; v < 4; v++) {
        a[v] = q8_pair(st.w[i][v]);
        b[v] = q8_pair(st.w[i][v] >> 8);
      }
      const u32 lo1[4] = {a[0], b[0], a[1], b[1]}, hi1[4] = {a[2], b[2], a[3], b[3]};
      const float fl = f16_to_float(st.s[i][0]), fh = f16_to_float(st.s[i][1]);
#pragma unroll
      for (int q = 0; q < NT; q++) {
        u32 xv[4];
#pragma unroll
        for (int c = 0; c < 4; c++) xv[c] = XBF ? bf16x2_to_f16x2(st.xv[i][q][c]) : st.xv[i][q][c];
        float d[4];
        block_mma(d, lo1, hi1, xv);
        acc[q][0] += fl * d[0];
        acc[q][1] += fl * d[1];
        acc[q][2] += fh * d[2];
        acc[q][3] += fh * d[3];
      }
    }
  }
}

DEV void store_out(float* y, float v) { *y = v; }
DEV void store_out(u16* y, float v) { *y = to_half(v); }
DEV void store_bf16(u16* y, float v) {
  u16 h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
  *y = h;
}

// y[m, n] = x[m] . W[n] (+ bias[n]) for the CTA's 8 NT rows of x (blockIdx.y) and 16 RT rows of W (blockIdx.x):
// RT * KS warps, m16 tile j = warp % RT over run ks = warp / RT of K's blocks, the runs added in order.
// XBF: x is bf16 (rounded to f16, saturated). OUT: 0 float32, 1 float16, 2 bfloat16.
template <int RT, int KS, int PD, int MINB, int NT, bool XBF, int OUT>
__global__ void __launch_bounds__(RT * KS * 32, MINB) q8_gemm(
    const u16* __restrict__ x, const u32* __restrict__ w, const u16* __restrict__ s, const float* __restrict__ bias,
    void* __restrict__ y, int M, int N, int K, int ldx, int ldy) {
  __shared__ float red[(KS > 1 ? KS - 1 : 1) * RT * 32 * 8];
  pdl_enter();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, j = warp % RT, ks = warp / RT;
  const int g = lane >> 2, t = lane & 3;
  const int nblk = K / 32;
  const int n0 = blockIdx.x * 16 * RT + 16 * j, m0 = blockIdx.y * 8 * NT;
  const float b_lo = bias ? bias[n0 + g] : 0.0f, b_hi = bias ? bias[n0 + g + 8] : 0.0f;
  const int per = (nblk + KS - 1) / KS;
  const int kb_lo = ks * per, kb_hi = min(nblk, kb_lo + per);
  const u32* wp[2] = {w + (long long)(n0 + g) * (K / 4) + kb_lo * 8 + 2 * t,
                      w + (long long)(n0 + g + 8) * (K / 4) + kb_lo * 8 + 2 * t};
  const u16* sp[2] = {s + (long long)(n0 + g) * nblk + kb_lo, s + (long long)(n0 + g + 8) * nblk + kb_lo};
  const u16* xp[NT];
#pragma unroll
  for (int q = 0; q < NT; q++) {
    const int m = m0 + 8 * q + g;
    xp[q] = x + (long long)(m < M ? m : m0) * ldx + kb_lo * 32 + 8 * t;  // a padding column reads a valid row
  }
  float acc[NT][4];
#pragma unroll
  for (int q = 0; q < NT; q++)
#pragma unroll
    for (int c = 0; c < 4; c++) acc[q][c] = 0.0f;
  Q8Stage<PD, NT> a, b;
  q8_load(a, wp, sp, xp, kb_hi - kb_lo);
  for (int k = kb_lo; k < kb_hi; k += 2 * PD) {
    q8_load(b, wp, sp, xp, kb_hi - k - PD);
    q8_mma<PD, NT, XBF>(acc, a, kb_hi - k);
    q8_load(a, wp, sp, xp, kb_hi - k - 2 * PD);
    q8_mma<PD, NT, XBF>(acc, b, kb_hi - k - PD);
  }
  if (KS > 1) {
    if (ks > 0) {
      float* r = red + (((ks - 1) * RT + j) * 32 + lane) * 8;
#pragma unroll
      for (int q = 0; q < NT; q++)
#pragma unroll
        for (int c = 0; c < 4; c++) r[q * 4 + c] = acc[q][c];
    }
    __syncthreads();
    if (ks != 0) return;
#pragma unroll
    for (int k = 1; k < KS; k++) {
      const float* r = red + (((k - 1) * RT + j) * 32 + lane) * 8;
#pragma unroll
      for (int q = 0; q < NT; q++)
#pragma unroll
        for (int c = 0; c < 4; c++) acc[q][c] += r[q * 4 + c];
    }
  }
#pragma unroll
  for (int q = 0; q < NT; q++)
#pragma unroll
    for (int c = 0; c < 4; c++) {
      const int m = m0 + 8 * q + 2 * t + (c & 1), n = n0 + g + 8 * (c >> 1);
      if (m >= M) continue;
      const float v = acc[q][c] + (c >> 1 ? b_hi : b_lo);
      const long long at = (long long)m * ldy + n;
      if (OUT == 0) store_out((float*)y + at, v);
      if (OUT == 1) store_out((u16*)y + at, v);
      if (OUT == 2) store_bf16((u16*)y + at, v);
    }
}
