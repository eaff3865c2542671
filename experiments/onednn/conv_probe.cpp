// oneDNN's forward convolution (with a fused ReLU) on shapes of the `full` config at batch
// 8, float32 and bfloat16, NHWC activations, weights in the layout oneDNN picks (packed once,
// as a load step would). Prints the median of 7 runs and the kernel oneDNN chose. Built and
// run by bench/onednn/run.sh; compare with bench/conv_lowering.py (XLA's convs).
#include <oneapi/dnnl/dnnl.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>
using namespace dnnl;
int main() {
  engine eng(engine::kind::cpu, 0); stream s(eng);
  struct Shape { int n,h,w,ci,co,k,st; } shapes[] = {{8,73,73,80,192,3,1},{8,147,147,32,64,3,1},{8,35,35,64,96,3,1},{8,17,17,160,192,7,1},{8,8,8,448,384,3,1}};
  for (auto sh : shapes) {
    for (auto dt : {memory::data_type::f32, memory::data_type::bf16}) {
      int ho=(sh.h-sh.k)/sh.st+1, wo=(sh.w-sh.k)/sh.st+1;
      int kh=sh.k, kw=sh.k;
      if (sh.k==7) { kh=1; ho=sh.h; wo=sh.w; }  // the 1x7 convs of Mixed_6b-6e, SAME
      memory::dims src={sh.n,sh.ci,sh.h,sh.w}, wei={sh.co,sh.ci,kh,kw}, dst={sh.n,sh.co,ho,wo};
      memory::dims pl={0, sh.k==7?3:0}, pr={0, sh.k==7?3:0};
      auto src_md=memory::desc(src,dt,memory::format_tag::nhwc);
      auto dst_md=memory::desc(dst,dt,memory::format_tag::nhwc);
      auto wei_any=memory::desc(wei,dt,memory::format_tag::any);
      primitive_attr attr; post_ops po; po.append_eltwise(algorithm::eltwise_relu,0.f,0.f); attr.set_post_ops(po);
      auto pd=convolution_forward::primitive_desc(eng,prop_kind::forward_inference,algorithm::convolution_direct,src_md,wei_any,dst_md,{sh.st,sh.st},pl,pr,attr);
      memory sm(src_md,eng), dm(dst_md,eng), wm(pd.weights_desc(),eng);
      auto conv=convolution_forward(pd);
      auto run=[&]{ conv.execute(s,{{DNNL_ARG_SRC,sm},{DNNL_ARG_WEIGHTS,wm},{DNNL_ARG_DST,dm}}); s.wait(); };
      run(); run();
      std::vector<double> t;
      for(int r=0;r<7;r++){auto a=std::chrono::steady_clock::now(); run(); t.push_back(std::chrono::duration<double,std::milli>(std::chrono::steady_clock::now()-a).count());}
      std::sort(t.begin(),t.end());
      double gf=2.0*sh.n*ho*wo*sh.co*sh.ci*kh*kw/1e9;
      printf("%dx%dx%dx%d k%dx%d ->%d %s: %.2f ms %.0f GFLOP/s impl %s\n",sh.n,sh.h,sh.w,sh.ci,kh,kw,sh.co,dt==memory::data_type::f32?"f32":"bf16",t[3],gf/t[3]*1e3,pd.impl_info_str());
    }
  }
}
