// Two independent convolutions of an Inception block (two branches), run one after the
// other with both threads each (how XLA runs our FFI calls today), against both at once
// with one thread each (how TensorFlow's inter-op pool runs Keras's). Forward, backward-data
// and backward-weights, float32, NHWC, at the `full` config's batch 8; the median of 9.
// Built and run by experiments/onednn/pair.sh.
#include <oneapi/dnnl/dnnl.hpp>
#include <omp.h>

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <functional>
#include <thread>
#include <vector>
using namespace dnnl;
using dt = memory::data_type;
using tag = memory::format_tag;

struct Conv { int n, h, w, ci, co, kh, kw; };

double Gflop(const Conv& c) { return 2.0 * c.n * c.h * c.w * c.ci * c.co * c.kh * c.kw / 1e9; }

// One convolution (SAME padding, stride 1) of one kind, its buffers and a runner.
struct Job {
  primitive prim;
  std::vector<memory> mems;
  std::unordered_map<int, memory> args;
  Job(engine& eng, const Conv& c, int kind) {
    memory::dims src{c.n, c.ci, c.h, c.w}, wei{c.co, c.ci, c.kh, c.kw}, dst{c.n, c.co, c.h, c.w};
    memory::dims pl{(c.kh - 1) / 2, (c.kw - 1) / 2}, pr{c.kh / 2, c.kw / 2};
    auto s = memory::desc(src, dt::f32, tag::nhwc), d = memory::desc(dst, dt::f32, tag::nhwc);
    auto w = memory::desc(wei, dt::f32, tag::hwio);
    auto fwd = convolution_forward::primitive_desc(eng, prop_kind::forward_training,
                                                   algorithm::convolution_direct, s, w, d,
                                                   {1, 1}, pl, pr);
    memory sm(s, eng), wm(w, eng), dm(d, eng);
    std::fill_n(static_cast<float*>(sm.get_data_handle()), s.get_size() / 4, 0.5f);
    std::fill_n(static_cast<float*>(wm.get_data_handle()), w.get_size() / 4, 0.01f);
    std::fill_n(static_cast<float*>(dm.get_data_handle()), d.get_size() / 4, 0.1f);
    if (kind == 0) {
      prim = convolution_forward(fwd);
      args = {{DNNL_ARG_SRC, sm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, dm}};
    } else if (kind == 1) {
      auto pd = convolution_backward_data::primitive_desc(eng, algorithm::convolution_direct, s,
                                                          w, d, {1, 1}, pl, pr, fwd);
      prim = convolution_backward_data(pd);
      args = {{DNNL_ARG_DIFF_SRC, sm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DIFF_DST, dm}};
    } else {
      auto pd = convolution_backward_weights::primitive_desc(eng, algorithm::convolution_direct,
                                                             s, w, d, {1, 1}, pl, pr, fwd);
      prim = convolution_backward_weights(pd);
      args = {{DNNL_ARG_SRC, sm}, {DNNL_ARG_DIFF_WEIGHTS, wm}, {DNNL_ARG_DIFF_DST, dm}};
    }
  }
  void Run(stream& st) { prim.execute(st, args); st.wait(); }
};

double Ms(std::chrono::steady_clock::time_point a) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a).count();
}

double Median(std::vector<double> t) {
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main() {
  engine eng(engine::kind::cpu, 0);
  const int reps = 9;
  // Pairs of branch convolutions that XLA could run at once: Mixed_5b's 5x5 and 3x3 branches,
  // Mixed_6b's 1x7 and 7x1 branches, Mixed_7b's 1x3 and 3x1 pairs.
  std::pair<Conv, Conv> pairs[] = {
      {{8, 35, 35, 48, 64, 5, 5}, {8, 35, 35, 64, 96, 3, 3}},
      {{8, 17, 17, 128, 128, 1, 7}, {8, 17, 17, 128, 128, 7, 1}},
      {{8, 17, 17, 160, 192, 7, 1}, {8, 17, 17, 160, 160, 1, 7}},
      {{8, 8, 8, 384, 384, 1, 3}, {8, 8, 8, 384, 384, 3, 1}},
  };
  const char* kinds[] = {"forward", "backward-data", "backward-weights"};
  printf("| convolution A | convolution B | kind | A then B, 2 threads each, ms | A and B at once, 1 thread each, ms | speed-up |\n");
  printf("|---|---|---|---:|---:|---:|\n");
  for (auto& [a, b] : pairs) {
    for (int kind = 0; kind < 3; kind++) {
      // One after the other, two threads each (primitives made with two threads).
      omp_set_num_threads(2);
      stream st(eng);
      Job ja(eng, a, kind), jb(eng, b, kind);
      std::vector<double> seq;
      for (int r = 0; r < reps + 2; r++) {
        auto t = std::chrono::steady_clock::now();
        ja.Run(st);
        jb.Run(st);
        if (r >= 2) seq.push_back(Ms(t));
      }
      // At once, one thread each: each thread makes its own primitive with one OpenMP
      // thread, then both start together at a barrier.
      std::vector<double> par(reps + 2);
      std::barrier sync(2);
      auto worker = [&](const Conv& c, bool timer) {
        omp_set_num_threads(1);
        stream s1(eng);
        Job j(eng, c, kind);
        for (int r = 0; r < reps + 2; r++) {
          sync.arrive_and_wait();
          auto t = std::chrono::steady_clock::now();
          j.Run(s1);
          sync.arrive_and_wait();
          if (timer) par[r] = Ms(t);
        }
      };
      std::thread t1(worker, std::cref(a), true), t2(worker, std::cref(b), false);
      t1.join();
      t2.join();
      par.erase(par.begin(), par.begin() + 2);
      double ms = Median(seq), mp = Median(par);
      printf("| %dx%d %d->%d at %dx%d | %dx%d %d->%d at %dx%d | %s | %.2f | %.2f | %.2f |\n",
             a.kh, a.kw, a.ci, a.co, a.h, a.w, b.kh, b.kw, b.ci, b.co, b.h, b.w, kinds[kind], ms,
             mp, ms / mp);
      fflush(stdout);
    }
  }
}
