// Host driver for the launch-geometry and softmax arithmetic of csrc/geometry.h.
//
// Reads one command per line from stdin and prints one result line per command, so that
// tests/test_cuda_compile.py can check the very functions the kernels call against
// independent Python computations, without a GPU. Commands:
//
//   packing Sq G                    -> rows mtiles mblocks warps | begin end per block
//   plan Sk base slots requested    -> total_tiles num_splits tiles_per_split
//   tiles Sk base slots req key_lim -> lo hi per split (one line)
//   keylimit Sk Sq i_last causal    -> limit
//   affected pos q_start q_end      -> 0|1
//   knocked key start len bits      -> 0|1   (bits: keep as a 0/1 string, '-' if empty)
//   intersect a0 a1 b0 b1           -> 0|1
//   online m_old tile_max           -> m_new m_use alpha
//   merge n lse_1 .. lse_n          -> lse w_1 .. w_n          ('-inf' accepted)
//   softmax n_splits Sk x_1 .. x_Sk -> lse   (base-e scores, '-inf' = masked; runs the
//                                     split plan, per-tile online steps, finish_lse and
//                                     merge_lse exactly as the kernels chain them)
//   capture G N                     -> heads_per_block head_chunks key_blocks
//   metrics N                       -> threads
//   frag                            -> per lane (32 lines' worth on one line, ';'-separated):
//                                      acc_row c0..3, acc_col c0..3, afrag_row a0..3,
//                                      afrag_col (a, e) a0e0 a0e1 .. a3e1, ldsm_k_key,
//                                      ldsm_k_dim, ldsm_v_key, ldsm_v_dim
//   pmap                            -> p_ntile(kk, a) for kk 0..3, a 0..3, then p_elem(a, e)
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "../geometry.h"

using namespace vg;

static float parse_float(const std::string& s) {
  if (s == "-inf") return neg_inf();
  if (s == "inf") return -neg_inf();
  return std::strtof(s.c_str(), nullptr);
}

static void print_float(float x) {
  if (x == neg_inf()) {
    std::printf("-inf");
  } else {
    std::printf("%.9g", double(x));
  }
}

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string cmd;
    if (!(in >> cmd)) continue;
    if (cmd == "packing") {
      int64_t Sq, G;
      in >> Sq >> G;
      const RowPacking p = attn_row_packing(Sq, G);
      std::printf("%lld %lld %lld %lld |", (long long)p.rows, (long long)p.mtiles, (long long)p.mblocks,
                  (long long)p.warps);
      for (int64_t mb = 0; mb < p.mblocks; ++mb) {
        std::printf(" %lld %lld", (long long)attn_block_row_begin(p, mb), (long long)attn_block_row_end(p, mb));
      }
      std::printf("\n");
    } else if (cmd == "plan") {
      int64_t Sk, base, slots, req;
      in >> Sk >> base >> slots >> req;
      const SplitPlan s = attn_split_plan(Sk, base, slots, req);
      std::printf("%lld %lld %lld\n", (long long)s.total_tiles, (long long)s.num_splits, (long long)s.tiles_per_split);
    } else if (cmd == "tiles") {
      int64_t Sk, base, slots, req, lim;
      in >> Sk >> base >> slots >> req >> lim;
      const SplitPlan s = attn_split_plan(Sk, base, slots, req);
      for (int64_t k = 0; k < s.num_splits; ++k) {
        int64_t lo, hi;
        attn_split_tiles(s, k, lim, &lo, &hi);
        std::printf("%s%lld %lld", k ? " " : "", (long long)lo, (long long)hi);
      }
      std::printf("\n");
    } else if (cmd == "keylimit") {
      int64_t Sk, Sq, i_last, causal;
      in >> Sk >> Sq >> i_last >> causal;
      std::printf("%lld\n", (long long)key_limit(Sk, Sq, i_last, causal != 0));
    } else if (cmd == "affected") {
      int64_t pos, a, b;
      in >> pos >> a >> b;
      std::printf("%d\n", row_affected(pos, a, b) ? 1 : 0);
    } else if (cmd == "knocked") {
      int64_t key, start, len;
      std::string bits;
      in >> key >> start >> len >> bits;
      std::vector<uint8_t> keep;
      if (bits != "-") {
        for (char c : bits) keep.push_back(c == '1' ? 1 : 0);
      }
      std::printf("%d\n", key_knocked(key, start, len, keep.data()) ? 1 : 0);
    } else if (cmd == "intersect") {
      int64_t a0, a1, b0, b1;
      in >> a0 >> a1 >> b0 >> b1;
      std::printf("%d\n", ranges_intersect(a0, a1, b0, b1) ? 1 : 0);
    } else if (cmd == "online") {
      std::string a, b;
      in >> a >> b;
      const OnlineStep s = online_softmax_step(parse_float(a), parse_float(b));
      print_float(s.m_new);
      std::printf(" ");
      print_float(s.m_use);
      std::printf(" ");
      print_float(s.alpha);
      std::printf("\n");
    } else if (cmd == "merge") {
      int64_t n;
      in >> n;
      std::vector<float> l(n);
      for (auto& x : l) {
        std::string s;
        in >> s;
        x = parse_float(s);
      }
      const float tot = merge_lse(l.data(), n, 1);
      print_float(tot);
      for (float x : l) {
        std::printf(" ");
        print_float(merge_weight(x, tot));
      }
      std::printf("\n");
    } else if (cmd == "softmax") {
      int64_t req, Sk;
      in >> req >> Sk;
      std::vector<float> x(Sk);
      for (auto& v : x) {
        std::string s;
        in >> s;
        v = parse_float(s);
      }
      const SplitPlan plan = attn_split_plan(Sk, 1, 1, req);
      std::vector<float> part(plan.num_splits);
      const float log2e = 1.4426950408889634f;
      for (int64_t k = 0; k < plan.num_splits; ++k) {
        int64_t lo, hi;
        attn_split_tiles(plan, k, Sk, &lo, &hi);
        float m = neg_inf(), l = 0.0f;
        for (int64_t t = lo; t < hi; ++t) {
          float tmax = neg_inf();
          for (int64_t j = t * kAttnTileKeys; j < imin(Sk, (t + 1) * kAttnTileKeys); ++j) {
            tmax = fmaxf(tmax, x[j] * log2e);
          }
          const OnlineStep st = online_softmax_step(m, tmax);
          float sum = 0.0f;
          for (int64_t j = t * kAttnTileKeys; j < imin(Sk, (t + 1) * kAttnTileKeys); ++j) {
            sum += exp2f(x[j] * log2e - st.m_use);
          }
          l = l * st.alpha + sum;
          m = st.m_new;
        }
        part[k] = finish_lse(m, l);
      }
      print_float(merge_lse(part.data(), plan.num_splits, 1));
      std::printf("\n");
    } else if (cmd == "capture") {
      int64_t G, N;
      in >> G >> N;
      std::printf("%lld %lld %lld\n", (long long)capture_heads_per_block(G), (long long)capture_head_chunks(G),
                  (long long)capture_key_blocks(N));
    } else if (cmd == "frag") {
      for (int lane = 0; lane < 32; ++lane) {
        if (lane) std::printf(";");
        for (int c = 0; c < 4; ++c) std::printf(" %d", acc_row(lane, c));
        for (int c = 0; c < 4; ++c) std::printf(" %d", acc_col(lane, c));
        for (int a = 0; a < 4; ++a) std::printf(" %d", afrag_row(lane, a));
        for (int a = 0; a < 4; ++a) {
          for (int e = 0; e < 2; ++e) std::printf(" %d", afrag_col(lane, a, e));
        }
        std::printf(" %d %d %d %d", ldsm_k_key(lane), ldsm_k_dim(lane), ldsm_v_key(lane), ldsm_v_dim(lane));
      }
      std::printf("\n");
    } else if (cmd == "pmap") {
      for (int kk = 0; kk < 4; ++kk) {
        for (int a = 0; a < 4; ++a) std::printf("%d ", p_ntile(kk, a));
      }
      for (int a = 0; a < 4; ++a) {
        for (int e = 0; e < 2; ++e) std::printf("%d ", p_elem(a, e));
      }
      std::printf("\n");
    } else if (cmd == "metrics") {
      int64_t N;
      in >> N;
      std::printf("%d\n", metrics_block_threads(N));
    } else {
      std::printf("unknown command %s\n", cmd.c_str());
      return 2;
    }
    std::fflush(stdout);
  }
  return 0;
}
