// The train step's slow convolutions (17x17 and 35x35 grids at batch 8, float32, NHWC
// activations, HWIO kernels): oneDNN's direct kernels (forward, backward data, backward
// weights; the kernel in the layout oneDNN picks, reordered from HWIO outside the timing)
// against im2col or col2im in plain C++ and one dnnl_sgemm call, Keras's way of running a
// convolution but with one large GEMM instead of Eigen's blocks. Median of 9 runs, ms.
// Built and run by experiments/onednn/im2col.sh.
#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <vector>

using namespace dnnl;
using tag = memory::format_tag;

struct Shape { int n, h, w, ci, co, kh, kw; };  // stride 1, SAME padding

double Median(const std::function<void()>& f) {
  f();
  f();
  std::vector<double> t;
  for (int r = 0; r < 9; r++) {
    auto a = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[4];
}

// Calls f(n, y, z) for every pixel of the batch, over both cores.
template <class F>
void EachPixel(const Shape& s, F f) {
#pragma omp parallel for collapse(2)
  for (int n = 0; n < s.n; n++)
    for (int y = 0; y < s.h; y++)
      for (int z = 0; z < s.w; z++) f(n, y, z);
}

// col[m, (i, j, c)] = x[n, oh + i - ph, ow + j - pw, c], zero outside the image.
void Im2col(const Shape& s, const float* x, float* col) {
  int ph = s.kh / 2, pw = s.kw / 2, K = s.kh * s.kw * s.ci;
  EachPixel(s, [&](int n, int oh, int ow) {
    float* row = col + ((size_t(n) * s.h + oh) * s.w + ow) * K;
    for (int i = 0; i < s.kh; i++)
      for (int j = 0; j < s.kw; j++) {
        int y = oh + i - ph, z = ow + j - pw;
        float* dst = row + (i * s.kw + j) * s.ci;
        if (y < 0 || y >= s.h || z < 0 || z >= s.w)
          std::memset(dst, 0, sizeof(float) * s.ci);
        else
          std::memcpy(dst, x + ((size_t(n) * s.h + y) * s.w + z) * s.ci, sizeof(float) * s.ci);
      }
  });
}

// dx[n, y, z, c] = sum of dcol over the (m, i, j) that read it (gathered per input pixel,
// so threads never write the same element).
void Col2im(const Shape& s, const float* dcol, float* dx) {
  int ph = s.kh / 2, pw = s.kw / 2, K = s.kh * s.kw * s.ci;
  EachPixel(s, [&](int n, int y, int z) {
    float* out = dx + ((size_t(n) * s.h + y) * s.w + z) * s.ci;
    std::memset(out, 0, sizeof(float) * s.ci);
    for (int i = 0; i < s.kh; i++)
      for (int j = 0; j < s.kw; j++) {
        int oh = y - i + ph, ow = z - j + pw;
        if (oh < 0 || oh >= s.h || ow < 0 || ow >= s.w) continue;
        const float* src = dcol + ((size_t(n) * s.h + oh) * s.w + ow) * K + (i * s.kw + j) * s.ci;
        for (int c = 0; c < s.ci; c++) out[c] += src[c];
      }
  });
}

int main() {
  engine eng(engine::kind::cpu, 0);
  stream st(eng);
  Shape shapes[] = {{8, 17, 17, 192, 192, 7, 1}, {8, 17, 17, 192, 192, 1, 7},
                    {8, 17, 17, 160, 160, 7, 1}, {8, 35, 35, 64, 96, 3, 3},
                    {8, 35, 35, 96, 96, 3, 3},   {8, 35, 35, 48, 64, 5, 5},
                    {8, 8, 8, 384, 384, 3, 1}};
  printf("| shape (batch 8, SAME) | GFLOP | fwd oneDNN | fwd im2col+sgemm | bwd data oneDNN | "
         "bwd data sgemm+col2im | bwd weights oneDNN | bwd weights im2col+sgemm |\n");
  printf("|---|---:|---:|---:|---:|---:|---:|---:|\n");
  for (auto s : shapes) {
    memory::dim M = memory::dim(s.n) * s.h * s.w, K = memory::dim(s.kh) * s.kw * s.ci, N = s.co;
    memory::dims src{s.n, s.ci, s.h, s.w}, wei{s.co, s.ci, s.kh, s.kw}, dst{s.n, s.co, s.h, s.w};
    memory::dims strides{1, 1}, pl{s.kh / 2, s.kw / 2}, pr{s.kh / 2, s.kw / 2};
    auto f32 = memory::data_type::f32;
    memory::desc src_md(src, f32, tag::nhwc), dst_md(dst, f32, tag::nhwc),
        wei_any(wei, f32, tag::any), wei_hwio(wei, f32, tag::hwio);
    std::vector<float> x(M * s.ci), y(M * N), dy(M * N), dx(M * s.ci), w(K * N), dw(K * N),
        col(M * K);
    for (size_t i = 0; i < x.size(); i++) x[i] = float(i % 13) * 0.1f - 0.6f;
    for (size_t i = 0; i < dy.size(); i++) dy[i] = float(i % 7) * 0.1f - 0.3f;
    for (size_t i = 0; i < w.size(); i++) w[i] = float(i % 5) * 0.01f - 0.02f;

    auto fpd = convolution_forward::primitive_desc(eng, prop_kind::forward_training,
        algorithm::convolution_direct, src_md, wei_any, dst_md, strides, pl, pr);
    auto dpd = convolution_backward_data::primitive_desc(eng, algorithm::convolution_direct,
        src_md, wei_any, dst_md, strides, pl, pr, fpd);
    auto wpd = convolution_backward_weights::primitive_desc(eng, algorithm::convolution_direct,
        src_md, wei_any, dst_md, strides, pl, pr, fpd);
    memory xm(src_md, eng, x.data()), ym(dst_md, eng, y.data()), dym(dst_md, eng, dy.data()),
        dxm(src_md, eng, dx.data()), wplain(wei_hwio, eng, w.data());
    memory wf(fpd.weights_desc(), eng), wd(dpd.weights_desc(), eng), dwm(wpd.diff_weights_desc(), eng);
    reorder(wplain, wf).execute(st, wplain, wf);
    reorder(wplain, wd).execute(st, wplain, wd);
    st.wait();
    convolution_forward fwd(fpd);
    convolution_backward_data bwd_d(dpd);
    convolution_backward_weights bwd_w(wpd);
    double t_fwd = Median([&] {
      fwd.execute(st, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wf}, {DNNL_ARG_DST, ym}});
      st.wait();
    });
    double t_bd = Median([&] {
      bwd_d.execute(st, {{DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_WEIGHTS, wd}, {DNNL_ARG_DIFF_SRC, dxm}});
      st.wait();
    });
    double t_bw = Median([&] {
      bwd_w.execute(st, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_DIFF_WEIGHTS, dwm}});
      st.wait();
    });
    std::vector<float> y_direct = y;
    double t_fwd2 = Median([&] {
      Im2col(s, x.data(), col.data());
      dnnl_sgemm('N', 'N', M, N, K, 1.f, col.data(), K, w.data(), N, 0.f, y.data(), N);
    });
    double err = 0;
    for (size_t i = 0; i < y.size(); i++) err = std::max(err, double(std::abs(y[i] - y_direct[i])));
    double t_bd2 = Median([&] {
      dnnl_sgemm('N', 'T', M, K, N, 1.f, dy.data(), N, w.data(), N, 0.f, col.data(), K);
      Col2im(s, col.data(), dx.data());
    });
    double t_bw2 = Median([&] {
      Im2col(s, x.data(), col.data());
      dnnl_sgemm('T', 'N', K, N, M, 1.f, col.data(), K, dy.data(), N, 0.f, dw.data(), N);
    });
    double gf = 2.0 * M * N * K / 1e9;
    printf("| %dx%dx%d k%dx%d ->%d | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |\n", s.h, s.w,
           s.ci, s.kh, s.kw, s.co, gf, t_fwd, t_fwd2, t_bd, t_bd2, t_bw, t_bw2);
    if (err > 1e-3) printf("  forward outputs differ by %.3g\n", err);
  }
}
