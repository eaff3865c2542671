// oneDNN convolutions as XLA FFI handlers (CPU): forward with an optional per-channel
// scale and offset (inference BatchNorm) and ReLU, backward-data and backward-weights;
// max and average pooling, forward and (for training) backward; BatchNorm with ReLU for
// training, forward and backward. Activations are NHWC, kernels HWIO, in float32 or
// bfloat16; scale and offset float32.
// Built and loaded by cnneb_jax/onednn.py.
//
// Primitives are cached by shape and settings (creating one costs far more than running
// it). Kernels stay in HWIO where oneDNN has a fast kernel for that (float32); otherwise
// they are reordered into its layout (see Run). Each call brings its own scratchpad; calls
// from two XLA threads take turns (see Execute).
#include <oneapi/dnnl/dnnl.hpp>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, ho, wo;
  int64_t sh, sw, pt, pb, pl, pr;
  memory::data_type dt;
  bool affine, relu;
  std::string Key(const char* kind) const {
    char b[256];
    snprintf(b, sizeof b, "%s:%ld,%ld,%ld,%ld,%ld,%ld,%ld,%ld,%ld:%ld,%ld,%ld,%ld,%ld,%ld:%d%d%d",
             kind, n, h, w, c, kh, kw, o, ho, wo, sh, sw, pt, pb, pl, pr, int(dt), affine, relu);
    return b;
  }
  memory::desc Src() const { return memory::desc({n, c, h, w}, dt, tag::nhwc); }
  memory::desc Dst() const { return memory::desc({n, o, ho, wo}, dt, tag::nhwc); }
  memory::desc WeiPlain() const { return memory::desc({o, c, kh, kw}, dt, tag::hwio); }
  memory::desc WeiAny() const { return memory::desc({o, c, kh, kw}, dt, tag::any); }
  // A float32 value per output channel, broadcast over N, H and W (BatchNorm's scale and
  // offset, applied as post-ops).
  memory::desc Channel() const { return memory::desc({1, o, 1, 1}, memory::data_type::f32, tag::nchw); }
};

struct Entry {
  dnnl::primitive prim;
  memory::desc wei;      // the kernel layout the primitive wants (pooling: its workspace)
  memory::desc scratch;  // its scratchpad
};

std::mutex cache_mu;
std::unordered_map<std::string, std::shared_ptr<Entry>> cache;

// Every primitive takes its scratchpad from the call (see Execute).
dnnl::primitive_attr ScratchpadAttr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// Post-ops run on each output tile while it is hot: y * scale + offset (inference
// BatchNorm, so kernels never need folding), then ReLU.
dnnl::primitive_attr Attr(const Geometry& g) {
  dnnl::primitive_attr attr = ScratchpadAttr();
  dnnl::post_ops po;
  if (g.affine) {
    po.append_binary(dnnl::algorithm::binary_mul, g.Channel());
    po.append_binary(dnnl::algorithm::binary_add, g.Channel());
  }
  if (g.relu) po.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  attr.set_post_ops(po);
  return attr;
}

// A primitive descriptor for kernels in plain HWIO when oneDNN has a fast kernel for them
// (float32: its brgconv kernels read HWIO as fast as their own layout), else for kernels in
// the layout it picks (bfloat16 wants pairs of input channels interleaved).
bool Fast(const char* impl) {
  std::string s(impl);
  return s.find("gemm") == std::string::npos && s.find("ref") == std::string::npos;
}

template <typename Make>
auto PlainOrAny(const Geometry& g, Make make) {
  try {
    auto pd = make(g.WeiPlain());
    if (Fast(pd.impl_info_str())) return pd;
  } catch (const dnnl::error&) {
  }
  return make(g.WeiAny());
}

dnnl::convolution_forward::primitive_desc FwdPd(const Geometry& g, dnnl::prop_kind kind,
                                                const memory::desc& wei) {
  return {Engine(), kind, dnnl::algorithm::convolution_direct, g.Src(), wei, g.Dst(),
          {g.sh, g.sw}, {g.pt, g.pl}, {g.pb, g.pr}, Attr(g)};
}

enum Kind { kForward, kBackwardData, kBackwardWeights };

// The cached primitive under `key`, made by `make(entry)` on first use.
template <typename Make>
std::shared_ptr<Entry> Cached(const std::string& key, Make make) {
  {
    std::lock_guard<std::mutex> lock(cache_mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto e = std::make_shared<Entry>();
  make(*e);
  std::lock_guard<std::mutex> lock(cache_mu);
  return cache.emplace(key, e).first->second;
}

std::shared_ptr<Entry> Lookup(const Geometry& g, Kind kind) {
  static const char* names[] = {"fwd", "bwd_data", "bwd_weights"};
  return Cached(g.Key(names[kind]), [&](Entry& e) {
    auto& eng = Engine();
    if (kind == kForward) {
      auto pd = PlainOrAny(g, [&](const memory::desc& wei) {
        return FwdPd(g, dnnl::prop_kind::forward_inference, wei);
      });
      e.prim = dnnl::convolution_forward(pd);
      e.wei = pd.weights_desc();
      e.scratch = pd.scratchpad_desc();
      return;
    }
    Geometry plain = g;
    plain.affine = false;
    plain.relu = false;
    auto hint = FwdPd(plain, dnnl::prop_kind::forward_training, g.WeiAny());
    auto attr = ScratchpadAttr();
    if (kind == kBackwardData) {
      auto pd = PlainOrAny(g, [&](const memory::desc& wei) {
        return dnnl::convolution_backward_data::primitive_desc(
            eng, dnnl::algorithm::convolution_direct, g.Src(), wei, g.Dst(), {g.sh, g.sw},
            {g.pt, g.pl}, {g.pb, g.pr}, hint, attr);
      });
      e.prim = dnnl::convolution_backward_data(pd);
      e.wei = pd.weights_desc();
      e.scratch = pd.scratchpad_desc();
    } else {
      auto pd = PlainOrAny(g, [&](const memory::desc& wei) {
        return dnnl::convolution_backward_weights::primitive_desc(
            eng, dnnl::algorithm::convolution_direct, g.Src(), wei, g.Dst(), {g.sh, g.sw},
            {g.pt, g.pl}, {g.pb, g.pr}, hint, attr);
      });
      e.prim = dnnl::convolution_backward_weights(pd);
      e.wei = pd.diff_weights_desc();
      e.scratch = pd.scratchpad_desc();
    }
  });
}

ffi::Error DataType(ffi::DataType t, memory::data_type* out) {
  if (t == ffi::DataType::F32) { *out = memory::data_type::f32; return ffi::Error::Success(); }
  if (t == ffi::DataType::BF16) { *out = memory::data_type::bf16; return ffi::Error::Success(); }
  return ffi::Error::InvalidArgument("oneDNN conv: float32 or bfloat16 only");
}

// x: NHWC, w: HWIO, y: NHWC.
ffi::Error Fill(Geometry* g, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer y,
                int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y.dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("oneDNN conv: rank-4 operands only");
  *g = Geometry{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3], yd[1], yd[2],
                sh, sw, pt, pb, pl, pr, memory::data_type::f32, false, false};
  if (x.element_type() != w.element_type() || x.element_type() != y.element_type())
    return ffi::Error::InvalidArgument("oneDNN conv: operands differ in dtype");
  return DataType(x.element_type(), &g->dt);
}

// 64 bits of a buffer's content, at memory speed (four independent lanes).
uint64_t Digest(const void* data, size_t bytes) {
  const uint64_t k = 0x9E3779B97F4A7C15ull;
  uint64_t h[4] = {1, 2, 3, 4};
  const uint64_t* p = static_cast<const uint64_t*>(data);
  size_t words = bytes / 8, i = 0;
  for (; i + 4 <= words; i += 4)
    for (int l = 0; l < 4; l++) h[l] = ((h[l] ^ p[i + l]) * k) ^ (h[l] >> 29);
  for (; i < words; i++) h[0] = ((h[0] ^ p[i]) * k) ^ (h[0] >> 29);
  const uint8_t* tail = static_cast<const uint8_t*>(data) + words * 8;
  for (size_t j = 0; j < bytes % 8; j++) h[1] = ((h[1] ^ tail[j]) * k) ^ (h[1] >> 29);
  return ((h[0] * 31 + h[1]) * 31 + h[2]) * 31 + h[3] ^ bytes;
}

// Inference kernels in the primitive's own layout, found again by their content, so a
// served model packs each kernel once, not on every call (bfloat16 kernels need packing;
// float32 ones are read in place). Bounded: past 2 GiB it starts over.
std::mutex packed_mu;
std::unordered_map<std::string, memory> packed_cache;
size_t packed_bytes = 0;

dnnl::stream& Stream() {
  thread_local dnnl::stream s(Engine());
  return s;
}

// Training's primitives run one at a time, process-wide (`exclusive`). Each already spreads
// over every core (OpenMP); XLA runs independent operations (Inception's branches, a conv's
// two gradients) from two threads at once, and two primitives then fight over the cores:
// the `full` train step ran 1.2-1.4x faster one at a time once BatchNorm, pooling and the
// 1x1 convs were oneDNN's too (docs/experiments.md §30). Inference's calls are not held.
std::mutex exclusive_mu;

// Executes `e` with a scratchpad of this call's own, and waits.
void Execute(const Entry& e, std::unordered_map<int, memory> args, bool exclusive = true) {
  std::vector<uint8_t> scratch(e.scratch.get_size());
  args[DNNL_ARG_SCRATCHPAD] = memory(e.scratch, Engine(), scratch.data());
  std::unique_lock<std::mutex> lock(exclusive_mu, std::defer_lock);
  if (exclusive) lock.lock();
  e.prim.execute(Stream(), args);
  Stream().wait();
}

// Runs `e` with the kernel argument `arg` given in plain HWIO at `wei_ptr`: reordered into
// the primitive's layout first (or after, for a kernel gradient). `cache`: keep the
// reordered kernel for the next call with the same content.
void Run(const Geometry& g, const Entry& e, std::unordered_map<int, memory> args, int arg,
         void* wei_ptr, bool wei_is_output, bool cache = false, bool exclusive = true) {
  auto& eng = Engine();
  dnnl::stream& s = Stream();
  memory plain(g.WeiPlain(), eng, wei_ptr);
  memory packed = plain;
  bool reorder = e.wei != g.WeiPlain();
  if (reorder && cache && !wei_is_output) {
    size_t bytes = g.WeiPlain().get_size();
    char key[64];
    snprintf(key, sizeof key, "%p:%016lx:%zu", static_cast<const void*>(&e),
             (unsigned long)Digest(wei_ptr, bytes), bytes);
    {
      std::lock_guard<std::mutex> lock(packed_mu);
      auto it = packed_cache.find(key);
      if (it != packed_cache.end()) packed = it->second, reorder = false;
    }
    if (reorder) {
      packed = memory(e.wei, eng);
      dnnl::reorder(plain, packed).execute(s, plain, packed);
      reorder = false;
      std::lock_guard<std::mutex> lock(packed_mu);
      if (packed_bytes + e.wei.get_size() > (size_t(2) << 30)) packed_cache.clear(), packed_bytes = 0;
      if (packed_cache.emplace(key, packed).second) packed_bytes += e.wei.get_size();
    }
  } else if (reorder) {
    packed = memory(e.wei, eng);
    if (!wei_is_output) dnnl::reorder(plain, packed).execute(s, plain, packed);
  }
  args[arg] = packed;
  Execute(e, args, exclusive);
  if (reorder && wei_is_output) {
    dnnl::reorder(packed, plain).execute(s, packed, plain);
    s.wait();
  }
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer scale, ffi::AnyBuffer offset,
                   ffi::Result<ffi::AnyBuffer> y, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pb, int64_t pl, int64_t pr, bool affine, bool relu, bool cache,
                   bool exclusive) {
  Geometry g;
  if (auto err = Fill(&g, x, w, *y, sh, sw, pt, pb, pl, pr); err.failure()) return err;
  g.affine = affine;
  g.relu = relu;
  try {
    auto e = Lookup(g, kForward);
    auto& eng = Engine();
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SRC, memory(g.Src(), eng, x.untyped_data())},
        {DNNL_ARG_DST, memory(g.Dst(), eng, y->untyped_data())}};
    if (affine) {
      args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1] =
          memory(g.Channel(), eng, scale.untyped_data());
      args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(1) | DNNL_ARG_SRC_1] =
          memory(g.Channel(), eng, offset.untyped_data());
    }
    Run(g, *e, args, DNNL_ARG_WEIGHTS, w.untyped_data(), false, cache, exclusive);
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("oneDNN conv forward: ") + err.what());
  }
  return ffi::Error::Success();
}

// dx from dy and w; x only gives its shape.
ffi::Error BackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                        int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                        int64_t pr) {
  Geometry g;
  if (auto err = Fill(&g, *dx, w, dy, sh, sw, pt, pb, pl, pr); err.failure()) return err;
  try {
    auto e = Lookup(g, kBackwardData);
    auto& eng = Engine();
    std::unordered_map<int, memory> args{
        {DNNL_ARG_DIFF_SRC, memory(g.Src(), eng, dx->untyped_data())},
        {DNNL_ARG_DIFF_DST, memory(g.Dst(), eng, dy.untyped_data())}};
    Run(g, *e, args, DNNL_ARG_WEIGHTS, w.untyped_data(), false);
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("oneDNN conv backward data: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy,
                           ffi::Result<ffi::AnyBuffer> dw, int64_t sh, int64_t sw,
                           int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Geometry g;
  if (auto err = Fill(&g, x, *dw, dy, sh, sw, pt, pb, pl, pr); err.failure()) return err;
  try {
    auto e = Lookup(g, kBackwardWeights);
    auto& eng = Engine();
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SRC, memory(g.Src(), eng, x.untyped_data())},
        {DNNL_ARG_DIFF_DST, memory(g.Dst(), eng, dy.untyped_data())}};
    Run(g, *e, args, DNNL_ARG_DIFF_WEIGHTS, dw->untyped_data(), true);
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("oneDNN conv backward weights: ") + err.what());
  }
  return ffi::Error::Success();
}

// Pooling's geometry: x (NHWC) and y of one dtype, a k x k window, stride s; `average`
// (over each window's real pixels, else max) rides in Geometry::affine, so it is in the key.
ffi::Error PoolGeometry(ffi::AnyBuffer x, ffi::AnyBuffer y, int64_t k, int64_t s, int64_t pt,
                        int64_t pb, int64_t pl, int64_t pr, bool average, Geometry* g) {
  auto xd = x.dimensions(), yd = y.dimensions();
  if (xd.size() != 4 || yd.size() != 4 || x.element_type() != y.element_type())
    return ffi::Error::InvalidArgument("oneDNN pool: rank-4 operands of one dtype only");
  memory::data_type dt;
  if (auto err = DataType(x.element_type(), &dt); err.failure()) return err;
  *g = Geometry{xd[0], xd[1], xd[2], xd[3], k, k, yd[3], yd[1], yd[2], s, s, pt, pb, pl, pr,
                dt, average, false};
  return ffi::Error::Success();
}

dnnl::pooling_forward::primitive_desc PoolPd(const Geometry& g, dnnl::prop_kind kind) {
  return {Engine(), kind,
          g.affine ? dnnl::algorithm::pooling_avg_exclude_padding
                   : dnnl::algorithm::pooling_max,
          g.Src(), g.Dst(), {g.sh, g.sw}, {g.kh, g.kw}, {0, 0}, {g.pt, g.pl}, {g.pb, g.pr},
          ScratchpadAttr()};
}

// A primitive's workspace (pooling's maxima, BatchNorm's ReLU mask) arrives as an XLA buffer
// that Python sized: it must be the size the primitive wants.
ffi::Error CheckWorkspace(const Entry& e, size_t bytes, const char* what) {
  if (e.wei.get_size() == bytes) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(what) + ": workspace of " +
                                     std::to_string(bytes) + " bytes, wants " +
                                     std::to_string(e.wei.get_size()));
}

// Max pooling, or average pooling over the real (unpadded) pixels of each window, NHWC.
ffi::Error Pool(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y, int64_t k, int64_t s,
                int64_t pt, int64_t pb, int64_t pl, int64_t pr, bool average, bool exclusive) {
  Geometry g;
  if (auto err = PoolGeometry(x, *y, k, s, pt, pb, pl, pr, average, &g); err.failure())
    return err;
  try {
    auto e = Cached(g.Key("pool"), [&](Entry& entry) {
      auto pd = PoolPd(g, dnnl::prop_kind::forward_inference);
      entry.prim = dnnl::pooling_forward(pd);
      entry.scratch = pd.scratchpad_desc();
    });
    Execute(*e, {{DNNL_ARG_SRC, memory(g.Src(), Engine(), x.untyped_data())},
                 {DNNL_ARG_DST, memory(g.Dst(), Engine(), y->untyped_data())}}, exclusive);
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("oneDNN pool: ") + err.what());
  }
  return ffi::Error::Success();
}

// Max pooling for training: y and oneDNN's workspace (which pixel of each window was the
// maximum, one byte per output value; its size is checked against the primitive's).
ffi::Error PoolTrain(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                     ffi::Result<ffi::AnyBuffer> ws, int64_t k, int64_t s, int64_t pt,
                     int64_t pb, int64_t pl, int64_t pr) {
  Geometry g;
  if (auto err = PoolGeometry(x, *y, k, s, pt, pb, pl, pr, false, &g); err.failure()) return err;
  try {
    auto e = Cached(g.Key("pool_train"), [&](Entry& entry) {
      auto pd = PoolPd(g, dnnl::prop_kind::forward_training);
      entry.prim = dnnl::pooling_forward(pd);
      entry.scratch = pd.scratchpad_desc();
      entry.wei = pd.workspace_desc();
    });
    if (auto err = CheckWorkspace(*e, ws->size_bytes(), "oneDNN pool"); err.failure())
      return err;
    Execute(*e, {{DNNL_ARG_SRC, memory(g.Src(), Engine(), x.untyped_data())},
                 {DNNL_ARG_DST, memory(g.Dst(), Engine(), y->untyped_data())},
                 {DNNL_ARG_WORKSPACE, memory(e->wei, Engine(), ws->untyped_data())}});
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("oneDNN pool (training): ") + err.what());
  }
  return ffi::Error::Success();
}

// The gradient of max pooling (from the forward's workspace) or of average pooling over
// each window's real pixels (the workspace is not read).
ffi::Error PoolBackward(ffi::AnyBuffer dy, ffi::AnyBuffer ws, ffi::Result<ffi::AnyBuffer> dx,
                        int64_t k, int64_t s, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                        bool average) {
  Geometry g;
  if (auto err = PoolGeometry(*dx, dy, k, s, pt, pb, pl, pr, average, &g); err.failure())
    return err;
  try {
    auto e = Cached(g.Key("pool_bwd"), [&](Entry& entry) {
      auto hint = PoolPd(g, dnnl::prop_kind::forward_training);
      dnnl::pooling_backward::primitive_desc pd(
          Engine(), hint.get_algorithm(), g.Src(), g.Dst(), {s, s}, {k, k}, {0, 0}, {pt, pl},
          {pb, pr}, hint, ScratchpadAttr());
      entry.prim = dnnl::pooling_backward(pd);
      entry.scratch = pd.scratchpad_desc();
      entry.wei = hint.workspace_desc();
    });
    std::unordered_map<int, memory> args{
        {DNNL_ARG_DIFF_DST, memory(g.Dst(), Engine(), dy.untyped_data())},
        {DNNL_ARG_DIFF_SRC, memory(g.Src(), Engine(), dx->untyped_data())}};
    if (!average) {
      if (auto err = CheckWorkspace(*e, ws.size_bytes(), "oneDNN pool gradient"); err.failure())
        return err;
      args[DNNL_ARG_WORKSPACE] = memory(e->wei, Engine(), ws.untyped_data());
    }
    Execute(*e, args);
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("oneDNN pool gradient: ") + err.what());
  }
  return ffi::Error::Success();
}

// BatchNorm (no scale, a shift) and ReLU for training, in one pass each way: the forward
// normalizes with the batch's statistics and returns them (population variance), with a
// workspace that records where the ReLU passed; the backward reads it.
struct BnGeometry {
  int64_t n, h, w, c;
  memory::data_type dt;
  float eps;
  memory::desc Data() const { return memory::desc({n, c, h, w}, dt, tag::nhwc); }
  std::string Key(const char* kind) const {
    char b[160];
    snprintf(b, sizeof b, "%s:%ld,%ld,%ld,%ld:%d:%a", kind, n, h, w, c, int(dt), eps);
    return b;
  }
};

const auto kBnFlags = dnnl::normalization_flags::use_shift |
                      dnnl::normalization_flags::fuse_norm_relu;

dnnl::batch_normalization_forward::primitive_desc BnForwardPd(const BnGeometry& g) {
  return {Engine(), dnnl::prop_kind::forward_training, g.Data(), g.Data(), g.eps, kBnFlags,
          ScratchpadAttr()};
}

std::shared_ptr<Entry> BnForward(const BnGeometry& g) {
  return Cached(g.Key("bn_fwd"), [&](Entry& e) {
    auto pd = BnForwardPd(g);
    e.prim = dnnl::batch_normalization_forward(pd);
    e.scratch = pd.scratchpad_desc();
    e.wei = pd.workspace_desc();
  });
}

ffi::Error BnGeometryOf(ffi::AnyBuffer x, float eps, BnGeometry* g) {
  auto d = x.dimensions();
  if (d.size() != 4) return ffi::Error::InvalidArgument("oneDNN batchnorm: NHWC operands only");
  *g = BnGeometry{d[0], d[1], d[2], d[3], memory::data_type::f32, eps};
  return DataType(x.element_type(), &g->dt);
}

memory::desc Vector(int64_t c) { return memory::desc({c}, memory::data_type::f32, tag::a); }

ffi::Error BnReluTrain(ffi::AnyBuffer x, ffi::AnyBuffer shift, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Result<ffi::AnyBuffer> mean, ffi::Result<ffi::AnyBuffer> var,
                       ffi::Result<ffi::AnyBuffer> ws, float eps) {
  BnGeometry g;
  if (auto err = BnGeometryOf(x, eps, &g); err.failure()) return err;
  try {
    auto e = BnForward(g);
    if (auto err = CheckWorkspace(*e, ws->size_bytes(), "oneDNN batchnorm"); err.failure())
      return err;
    auto& eng = Engine();
    Execute(*e, {{DNNL_ARG_SRC, memory(g.Data(), eng, x.untyped_data())},
                 {DNNL_ARG_DST, memory(g.Data(), eng, y->untyped_data())},
                 {DNNL_ARG_SHIFT, memory(Vector(g.c), eng, shift.untyped_data())},
                 {DNNL_ARG_MEAN, memory(Vector(g.c), eng, mean->untyped_data())},
                 {DNNL_ARG_VARIANCE, memory(Vector(g.c), eng, var->untyped_data())},
                 {DNNL_ARG_WORKSPACE, memory(e->wei, eng, ws->untyped_data())}});
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("oneDNN batchnorm: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error BnReluBackward(ffi::AnyBuffer x, ffi::AnyBuffer mean,
                          ffi::AnyBuffer var, ffi::AnyBuffer ws, ffi::AnyBuffer dy,
                          ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dshift,
                          float eps) {
  BnGeometry g;
  if (auto err = BnGeometryOf(x, eps, &g); err.failure()) return err;
  try {
    auto e = Cached(g.Key("bn_bwd"), [&](Entry& entry) {
      auto hint = BnForwardPd(g);
      dnnl::batch_normalization_backward::primitive_desc pd(
          Engine(), dnnl::prop_kind::backward, g.Data(), g.Data(), g.Data(), g.eps, kBnFlags,
          hint, ScratchpadAttr());
      entry.prim = dnnl::batch_normalization_backward(pd);
      entry.scratch = pd.scratchpad_desc();
      entry.wei = hint.workspace_desc();
    });
    auto& eng = Engine();
    Execute(*e, {{DNNL_ARG_SRC, memory(g.Data(), eng, x.untyped_data())},
                 {DNNL_ARG_MEAN, memory(Vector(g.c), eng, mean.untyped_data())},
                 {DNNL_ARG_VARIANCE, memory(Vector(g.c), eng, var.untyped_data())},
                 {DNNL_ARG_WORKSPACE, memory(e->wei, eng, ws.untyped_data())},
                 {DNNL_ARG_DIFF_DST, memory(g.Data(), eng, dy.untyped_data())},
                 {DNNL_ARG_DIFF_SRC, memory(g.Data(), eng, dx->untyped_data())},
                 {DNNL_ARG_DIFF_SHIFT, memory(Vector(g.c), eng, dshift->untyped_data())}});
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("oneDNN batchnorm gradient: ") + err.what());
  }
  return ffi::Error::Success();
}

}  // namespace

// The workspace bytes BnReluTrain wants for an NHWC input (Python sizes its output with
// it at trace time); -1 where oneDNN has no such primitive.
extern "C" int64_t cnneb_onednn_bn_workspace_bytes(int64_t n, int64_t h, int64_t w, int64_t c,
                                                   int bf16, float eps) {
  try {
    BnGeometry g{n, h, w, c, bf16 ? memory::data_type::bf16 : memory::data_type::f32, eps};
    return static_cast<int64_t>(BnForward(g)->wei.get_size());
  } catch (const dnnl::error&) {
    return -1;
  }
}

#define POOL_ATTRS                                                             \
  .Attr<int64_t>("window").Attr<int64_t>("stride").Attr<int64_t>("pad_top")    \
      .Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left").Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(cnneb_onednn_bn_relu_train, BnReluTrain,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(cnneb_onednn_bn_relu_bwd, BnReluBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(cnneb_onednn_pool_train, PoolTrain,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() POOL_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(cnneb_onednn_pool_bwd, PoolBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() POOL_ATTRS
                                  .Attr<bool>("average"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(cnneb_onednn_pool, Pool,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() POOL_ATTRS
                                  .Attr<bool>("average")
                                  .Attr<bool>("exclusive"));

#define CONV_ATTRS                                                           \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top") \
      .Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left").Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(cnneb_onednn_conv_fwd, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() CONV_ATTRS
                                  .Attr<bool>("affine")
                                  .Attr<bool>("relu")
                                  .Attr<bool>("cache")
                                  .Attr<bool>("exclusive"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(cnneb_onednn_conv_bwd_data, BackwardData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(cnneb_onednn_conv_bwd_weights, BackwardWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() CONV_ATTRS);
