// torch dispatcher registration of the BiQGEMM CPU kernel: the CPU and AutogradCPU kernels of the existing
// `qgraph::biqgemm` schema (defined in Python, qgraph/kernels/op.py), so a call from Python, TorchScript or an
// Inductor-compiled graph reaches the C kernel without Python validation + ctypes.
//
// Built at first use against the installed torch by qgraph/kernels/native.py (system g++, cache outside the
// package, keyed by a content hash) and linked against the torch-free kernel library (_biqgemm_cpu*.so), so both
// paths share one kernel instance (thread pool, thread count, LUT/GEMM threshold).
//
// - Layout "cpu-lut4": validated here with the same checks and messages as qgraph/kernels/cpu.py; bad input raises
//   qgraph.errors.KernelError (through the Python error indicator when Python runs the process, else c10::Error).
// - Any other layout (or "cpu-lut4" replaced from Python): the Python implementation, registered as the private
//   op `qgraph::_biqgemm_py` with the same schema.
// - AutogradCPU: without grad, straight below autograd; with grad (x or bias requiring it), a C++ autograd
//   function whose backward calls `qgraph::biqgemm_grad_x` (grad @ W) and sums the bias gradient, as op.py does.
#include <ATen/Parallel.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "biqgemm.h"
#include "decode_math.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr const char* kLayout = "cpu-lut4";
constexpr const char* kLayoutK = "cpu-lut4k";  // block scales (mode | QG_MODE_KSCALES)
std::atomic<bool> g_native_layout{true};  // false once Python replaces the cpu-lut4 implementation

[[noreturn]] void kernel_error(const std::string& msg) {
  if (Py_IsInitialized()) {
    pybind11::gil_scoped_acquire gil;
    PyObject* mod = PyImport_ImportModule("qgraph.errors");
    PyObject* cls = mod ? PyObject_GetAttrString(mod, "KernelError") : nullptr;
    Py_XDECREF(mod);
    if (cls) {
      PyErr_SetString(cls, msg.c_str());
      Py_DECREF(cls);
    } else {
      PyErr_Clear();
      PyErr_SetString(PyExc_RuntimeError, msg.c_str());
    }
    python_error err;
    err.persist();
    throw err;
  }
  TORCH_CHECK(false, "KernelError: ", msg);
}

std::string shape_str(c10::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << s[i] << (s.size() == 1 ? "," : (i + 1 < s.size() ? ", " : ""));
  o << ")";
  return o.str();
}

std::string dtype_str(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

bool is_float(c10::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

void check_tensor(const char* name, const Tensor& t) {
  if (t.device().type() != c10::DeviceType::CPU)
    kernel_error(std::string("cpu-lut4 ") + name + " is on " + t.device().str() +
                 "; the CPU kernel needs CPU tensors");
  if (!t.is_contiguous())
    kernel_error(std::string("cpu-lut4 ") + name + " must be contiguous (repack with qgraph.kernels.cpu.pack)");
}

// Mirrors qgraph.kernels.cpu._check_packed_k (layout cpu-lut4k: the alpha slot holds the block-scale codes).
int check_packed_k(const Tensor& packed, const Tensor& kscales, const OptTensor& offset, int64_t m, int64_t k,
                   int64_t gs) {
  const int64_t tiles = (m + QG_TILE_ROWS - 1) / QG_TILE_ROWS, groups = (k + gs - 1) / gs;
  const int64_t blocks = groups * ((gs + QG_BLOCK_K - 1) / QG_BLOCK_K);
  const std::string geo = std::to_string(m) + "x" + std::to_string(k);
  if (offset.has_value() && offset->defined())
    kernel_error("cpu-lut4k weights carry their offsets in the block-scale buffer; pass offset=None");
  const std::vector<int64_t> want{tiles, 128 + 48 * groups};
  if (kscales.sizes() != c10::IntArrayRef(want))
    kernel_error("cpu-lut4k block scales must be uint8 " + shape_str(want) + " for a " + geo +
                 " matrix with group_size=" + std::to_string(gs) + ", got " + shape_str(kscales.sizes()));
  if (packed.scalar_type() != at::kByte || packed.dim() != 4 || packed.size(0) != tiles || packed.size(1) != blocks ||
      packed.size(2) < 1 || packed.size(2) > 8 || packed.size(3) != 4 * QG_TILE_ROWS)
    kernel_error("cpu-lut4k packed must be uint8 [" + std::to_string(tiles) + ", " + std::to_string(blocks) +
                 ", q, 128] with q in 1..8 for a " + geo + " matrix, got " + dtype_str(packed.scalar_type()) + " " +
                 shape_str(packed.sizes()));
  return static_cast<int>(packed.size(2));
}

// Mirrors qgraph.kernels.cpu.check_packed; returns q.
int check_packed(const Tensor& packed, const Tensor& alpha, const OptTensor& offset, int64_t m, int64_t k,
                 int64_t gs) {
  if (m < 1 || k < 1)
    kernel_error("out_features and in_features must be >= 1, got " + std::to_string(m) + ", " + std::to_string(k));
  if (gs < 1 || gs > k)
    kernel_error("group_size must be in 1..in_features=" + std::to_string(k) + ", got " + std::to_string(gs));
  check_tensor("packed", packed);
  check_tensor("alpha", alpha);
  if (alpha.scalar_type() == at::kByte) return check_packed_k(packed, alpha, offset, m, k, gs);
  if (alpha.scalar_type() != at::kFloat || alpha.dim() != 4)
    kernel_error("cpu-lut4 alpha must be float32 [Mt, G, q, 32], got " + dtype_str(alpha.scalar_type()) + " " +
                 shape_str(alpha.sizes()));
  const int64_t q = alpha.size(2);
  if (q < 1 || q > 8) kernel_error("cpu-lut4 alpha has q=" + std::to_string(q) + " bit-planes; 1..8 are supported");
  const int64_t tiles = (m + QG_TILE_ROWS - 1) / QG_TILE_ROWS, groups = (k + gs - 1) / gs;
  const int64_t blocks = groups * ((gs + QG_BLOCK_K - 1) / QG_BLOCK_K);
  const std::vector<int64_t> want_a{tiles, groups, q, QG_TILE_ROWS};
  const std::string geo = std::to_string(m) + "x" + std::to_string(k);
  if (alpha.sizes() != c10::IntArrayRef(want_a))
    kernel_error("cpu-lut4 alpha shape " + shape_str(alpha.sizes()) + " does not fit a " + geo + " matrix with q=" +
                 std::to_string(q) + ", group_size=" + std::to_string(gs) + " (expected " + shape_str(want_a) + ")");
  const std::vector<int64_t> want_p{tiles, blocks, q, 4 * QG_TILE_ROWS};
  if (packed.scalar_type() != at::kByte || packed.sizes() != c10::IntArrayRef(want_p))
    kernel_error("cpu-lut4 packed must be uint8 " + shape_str(want_p) + " for a " + geo + " matrix with q=" +
                 std::to_string(q) + ", group_size=" + std::to_string(gs) + "; got " +
                 dtype_str(packed.scalar_type()) + " " + shape_str(packed.sizes()));
  if (offset.has_value() && offset->defined()) {
    check_tensor("offset", *offset);
    const std::vector<int64_t> want_z{tiles, groups, QG_TILE_ROWS};
    if (offset->scalar_type() != at::kFloat || offset->sizes() != c10::IntArrayRef(want_z))
      kernel_error("cpu-lut4 offset must be float32 " + shape_str(want_z) + " for this matrix, got " +
                   dtype_str(offset->scalar_type()) + " " + shape_str(offset->sizes()));
  }
  return static_cast<int>(q);
}

void check_isa_env() {
  const char* want = std::getenv("QGRAPH_BIQGEMM_ISA");
  if (!want || !*want) return;
  const char* names[] = {"scalar", "avx2", "avx512vbmi"};
  bool known = false;
  for (const char* n : names) known |= std::strcmp(n, want) == 0;
  if (!known)
    kernel_error(std::string("QGRAPH_BIQGEMM_ISA='") + want +
                 "' is not one of ('scalar', 'avx2', 'avx512vbmi'); unset it or pick one of those");
  if (!qg_biqgemm_isa_supported(want))
    kernel_error(std::string("QGRAPH_BIQGEMM_ISA='") + want + "' but this CPU cannot run that path");
}

c10::OperatorHandle op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

using BiqgemmSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, int64_t,
                          int64_t, int64_t, c10::string_view, c10::string_view);

Tensor call_python_impl(const Tensor& x, const Tensor& packed, const Tensor& alpha, const OptTensor& offset,
                        const OptTensor& bias, int64_t m, int64_t k, int64_t gs, c10::string_view layout,
                        c10::string_view mode) {
  static auto op = op_handle("qgraph::_biqgemm_py").typed<BiqgemmSig>();
  return op.call(x, packed, alpha, offset, bias, m, k, gs, layout, mode);
}

Tensor biqgemm_cpu(const Tensor& x, const Tensor& packed, const Tensor& alpha, const OptTensor& offset,
                   const OptTensor& bias, int64_t m, int64_t k, int64_t gs, c10::string_view layout,
                   c10::string_view mode) {
  if ((layout != kLayout && layout != kLayoutK) || !g_native_layout.load(std::memory_order_relaxed))
    return call_python_impl(x, packed, alpha, offset, bias, m, k, gs, layout, mode);
  int mode_id;
  if (mode == "exact") {
    mode_id = QG_MODE_EXACT;
  } else if (mode == "fast") {
    mode_id = QG_MODE_FAST;
  } else {
    kernel_error("mode must be one of ('exact', 'fast'), got '" + std::string(mode) + "'");
  }
  if (!is_float(x.scalar_type()))
    kernel_error("x must be float32, bfloat16 or float16, got " + dtype_str(x.scalar_type()) + "; cast it first");
  if (x.dim() < 1 || x.size(-1) != k)
    kernel_error("x must have shape [..., " + std::to_string(k) + "] (in_features), got " + shape_str(x.sizes()));
  if (x.device().type() != c10::DeviceType::CPU)
    kernel_error("x is on " + x.device().str() + " but this kernel runs on cpu; move it there");
  const int q = check_packed(packed, alpha, offset, m, k, gs);
  if ((alpha.scalar_type() == at::kByte) != (layout == kLayoutK))
    kernel_error("layout '" + std::string(layout) + "' does not match its alpha tensor (" +
                 dtype_str(alpha.scalar_type()) + ")");
  if (layout == kLayoutK) mode_id |= QG_MODE_KSCALES;
  Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = *bias;
    if (!is_float(b.scalar_type()))
      kernel_error("bias must be a float tensor or None, got " + dtype_str(b.scalar_type()));
    if (b.dim() != 1 || b.size(0) != m)
      kernel_error("bias must have shape [" + std::to_string(m) + "] (out_features), got " + shape_str(b.sizes()));
    if (b.device() != x.device()) kernel_error("bias is on " + b.device().str() + " but x is on " + x.device().str());
    if (b.scalar_type() != at::kFloat || !b.is_contiguous()) b = b.to(at::kFloat).contiguous();
  }
  check_isa_env();
  qg_biqgemm_set_num_threads(at::get_num_threads());  // every call: the ctypes path sets it too
  Tensor x2 = x.reshape({-1, k});
  if (x2.scalar_type() != at::kFloat || !x2.is_contiguous()) x2 = x2.to(at::kFloat).contiguous();
  const int64_t n = x2.size(0);
  Tensor y = at::empty({n, m}, x2.options());
  if (n) {
    const int rc = qg_biqgemm_f32(x2.data_ptr<float>(), n, k, packed.data_ptr(),
                                  static_cast<const float*>(alpha.data_ptr()),
                                  offset.has_value() && offset->defined() ? offset->data_ptr<float>() : nullptr,
                                  b.defined() ? b.data_ptr<float>() : nullptr, m, q, gs, mode_id,
                                  y.data_ptr<float>());
    if (rc != 0)
      kernel_error("BiQGEMM CPU kernel failed with code " + std::to_string(rc) + " (n=" + std::to_string(n) + ", " +
                   std::to_string(m) + "x" + std::to_string(k) + ", q=" + std::to_string(q) + ")");
  }
  if (x.dim() != 2) {
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
    shape.push_back(m);
    y = y.reshape(shape);
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

Tensor call_op_below_autograd(const Tensor& x, const Tensor& packed, const Tensor& alpha, const OptTensor& offset,
                              const OptTensor& bias, int64_t m, int64_t k, int64_t gs, c10::string_view layout,
                              c10::string_view mode) {
  static auto op = op_handle("qgraph::biqgemm").typed<BiqgemmSig>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, packed, alpha, offset, bias, m, k, gs, layout, mode);
}

struct BiqgemmFunction : public torch::autograd::Function<BiqgemmFunction> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& packed,
                        const Tensor& alpha, const OptTensor& offset, const OptTensor& bias, int64_t m, int64_t k,
                        int64_t gs, c10::string_view layout, c10::string_view mode) {
    Tensor y = call_op_below_autograd(x, packed, alpha, offset, bias, m, k, gs, layout, mode);
    const bool has_offset = offset.has_value() && offset->defined();
    ctx->save_for_backward(has_offset ? torch::autograd::variable_list{packed, alpha, *offset}
                                      : torch::autograd::variable_list{packed, alpha});
    ctx->saved_data["m"] = m;
    ctx->saved_data["k"] = k;
    ctx->saved_data["gs"] = gs;
    ctx->saved_data["layout"] = std::string(layout);
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    // flags, not needs_input_grad(i): a missing optional (offset None) shifts the autograd input indices
    ctx->saved_data["need_gx"] = x.requires_grad();
    ctx->saved_data["need_gb"] = bias.has_value() && bias->defined() && bias->requires_grad();
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                  torch::autograd::variable_list grads) {
    using GradSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, int64_t, int64_t, int64_t,
                           c10::string_view);
    static auto grad_op = op_handle("qgraph::biqgemm_grad_x").typed<GradSig>();
    const auto saved = ctx->get_saved_variables();
    const int64_t m = ctx->saved_data["m"].toInt(), k = ctx->saved_data["k"].toInt();
    const int64_t gs = ctx->saved_data["gs"].toInt();
    const std::string layout = ctx->saved_data["layout"].toStringRef();
    const auto x_dtype = static_cast<c10::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    const Tensor& grad = grads[0];
    Tensor gx, gb;
    if (ctx->saved_data["need_gx"].toBool()) {
      const OptTensor offset = saved.size() > 2 ? OptTensor(saved[2]) : OptTensor();
      gx = grad_op.call(grad, saved[0], saved[1], offset, m, k, gs, layout).to(x_dtype);
    }
    if (ctx->saved_data["need_gb"].toBool()) gb = grad.reshape({-1, m}).sum(0);
    return {gx, Tensor(), Tensor(), Tensor(), gb, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor biqgemm_autograd_cpu(const Tensor& x, const Tensor& packed, const Tensor& alpha, const OptTensor& offset,
                            const OptTensor& bias, int64_t m, int64_t k, int64_t gs, c10::string_view layout,
                            c10::string_view mode) {
  const bool need = at::GradMode::is_enabled() &&
                    (x.requires_grad() || (bias.has_value() && bias->defined() && bias->requires_grad()));
  if (!need) return call_op_below_autograd(x, packed, alpha, offset, bias, m, k, gs, layout, mode);
  return BiqgemmFunction::apply(x, packed, alpha, offset, bias, m, k, gs, layout, mode);
}

// ------------------------------------------------------------------------------------------ decode attention
// `qgraph::decode_attention` (schema: qgraph/kernels/attention.py): softmax(q k^T * scale + mask) v for one query
// row per head, with grouped key/value heads read in place (no repeat_kv copy) and masked key positions skipped.
// One thread: at decode the whole problem is a few hundred KB, less than an OpenMP team's wake-up costs
// (torch's flash kernel: 35-90 us per call for SmolLM2's 9 heads x 256 positions, this loop: a few us).
Tensor decode_attention_cpu(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const OptTensor& mask_in,
                            double scale) {
  if (q_in.dim() != 4 || k_in.dim() != 4 || v_in.dim() != 4)
    kernel_error("decode_attention takes q [B, H, 1, D], k and v [B, KVH, S, D]; got q " + shape_str(q_in.sizes()) +
                 ", k " + shape_str(k_in.sizes()) + ", v " + shape_str(v_in.sizes()));
  if (q_in.scalar_type() != at::kFloat || k_in.scalar_type() != at::kFloat || v_in.scalar_type() != at::kFloat)
    kernel_error("decode_attention runs float32 q, k and v only; cast them with .float()");
  const int64_t B = q_in.size(0), H = q_in.size(1), D = q_in.size(3), KVH = k_in.size(1), S = k_in.size(2);
  if (q_in.size(2) != 1) kernel_error("decode_attention is for one query row (decode); got q " + shape_str(q_in.sizes()));
  if (k_in.size(0) != B || v_in.sizes() != k_in.sizes() || k_in.size(3) != D || KVH == 0 || H % KVH != 0)
    kernel_error("decode_attention: k and v must both be [B, KVH, S, D] with H a multiple of KVH; got q " +
                 shape_str(q_in.sizes()) + ", k " + shape_str(k_in.sizes()) + ", v " + shape_str(v_in.sizes()));
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  Tensor mask;
  int64_t mask_b_stride = 0;
  if (mask_in.has_value() && mask_in->defined()) {
    const Tensor& m = *mask_in;
    if (m.scalar_type() != at::kBool || m.dim() != 4 || m.size(1) != 1 || m.size(2) != 1 || m.size(3) != S ||
        (m.size(0) != 1 && m.size(0) != B))
      kernel_error("decode_attention: mask must be bool [B or 1, 1, 1, S] (True = attend); got " +
                   std::string(c10::toString(m.scalar_type())) + " " + shape_str(m.sizes()));
    mask = m.contiguous();
    mask_b_stride = m.size(0) == 1 ? 0 : S;
  }
  Tensor out = at::zeros({B, H, 1, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t rep = H / KVH;
  const float sc = static_cast<float>(scale);
  std::vector<float> score(rep * ((S + 15) / 16 * 16));
  std::vector<float> mx(rep), total(rep);
  for (int64_t b = 0; b < B; ++b) {
    const bool* mb = mp ? mp + b * mask_b_stride : nullptr;
    for (int64_t g = 0; g < KVH; ++g) {  // the rep query heads of one key/value head read its rows once
      const float* qg = qp + (b * H + g * rep) * D;
      const float* kg = kp + (b * KVH + g) * S * D;
      const float* vg = vp + (b * KVH + g) * S * D;
      float* og = op + (b * H + g * rep) * D;
      attend_group(qg, kg, vg, og, mb, S, D, rep, sc, score.data(), mx.data(), total.data());
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qgraph, CPU, m) {
  m.impl("biqgemm", biqgemm_cpu);
  m.impl("decode_attention", decode_attention_cpu);
}

TORCH_LIBRARY_IMPL(qgraph, AutogradCPU, m) { m.impl("biqgemm", biqgemm_autograd_cpu); }

extern "C" {
// Version of this shim's contract with qgraph/kernels/native.py.
__attribute__((visibility("default"))) int qg_torch_shim_version(void) { return 4; }
// 0: "cpu-lut4" calls go to the Python implementation (it was replaced with register_layout(replace=True)).
__attribute__((visibility("default"))) void qg_torch_shim_set_native_layout(int on) { g_native_layout = on != 0; }
}
