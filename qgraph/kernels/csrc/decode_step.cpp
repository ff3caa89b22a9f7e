// `torch.classes.qgraph.DecodePlan`: one decode step of a Llama-family causal LM (token in, next greedy token or the
// logits out) in native code, over the model's own tensors (no copies): BiQGEMM for every quantized Linear,
// fp32 RMSNorm, rotary embedding from precomputed cos/sin rows, SiLU-gated MLP, one-query grouped attention over a
// static KV cache written in place, and the greedy argmax.
//
// Why not torch.compile: on SmolLM2-135M BCQ-3 the compiled step spent 1.7 ms in Inductor's wrapper (~500 kernel
// calls) and 1.4 ms in dynamo's guards of a 9.5 ms step, around 5.3 ms of kernels. Here a step is one call from
// Python, run by a thread team (`Team`) that splits every Linear's rows and the attention between its threads. qgraph/llm/native_decode.py builds the plan from a transformers model and says which models qualify;
// every check on shapes is made there and again here (bad plans raise, they never read out of bounds).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "biqgemm.h"
#include "decode_math.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// One Linear: BiQGEMM ("cpu-lut4") or float32 (weight [m, k]).
struct Lin {
  bool bcq = true;
  Tensor packed, alpha, offset, bias, weight;
  int64_t m = 0, k = 0, gs = 0;
  int q = 0, mode = QG_MODE_EXACT;
  bool kscales = false;  // layout cpu-lut4k
};

struct Layer {
  std::vector<int64_t> qkv, gate_up;  // Linears whose outputs are concatenated (q|k|v, gate|up)
  int64_t o = -1, down = -1;
  Tensor in_norm, post_norm;
  Tensor kc, vc;  // [1, KVH, S, D] float32, contiguous (a transformers StaticCache layer)
};

void check(bool ok, const std::string& msg) { TORCH_CHECK(ok, "DecodePlan: ", msg); }

void check_f32(const Tensor& t, int64_t numel, const char* what) {
  check(t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
            t.numel() == numel,
        std::string(what) + " must be a contiguous CPU float32 tensor of " + std::to_string(numel) + " elements");
}

__attribute__((target_clones("avx512f", "avx2", "default"), optimize("O3")))
void rmsnorm(const float* x, const float* w, float* out, int64_t n, float eps) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
  const float inv = 1.f / std::sqrt(s / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

// HF rotate_half: out = x * cos + cat(-x[D/2:], x[:D/2]) * sin, for `heads` rows of D.
void rope(float* x, int64_t heads, int64_t d, const float* cs, const float* sn) {
  const int64_t h = d / 2;
  for (int64_t r = 0; r < heads; ++r) {
    float* v = x + r * d;
    for (int64_t i = 0; i < h; ++i) {
      const float a = v[i], b = v[i + h];
      v[i] = a * cs[i] - b * sn[i];
      v[i + h] = b * cs[i + h] + a * sn[i + h];
    }
  }
}

// A fork-join team for one decode step: the caller is thread 0, helpers are started once and spin briefly between
// steps (then sleep), and `barrier` is a sense-reversing spin barrier. One parallel region per token replaces a
// pool hand-off per kernel call (121 a token on SmolLM2) and lets each thread stream a contiguous share of every
// weight. A thread that is not scheduled stalls the others at the next barrier, as in llama.cpp's graph runner;
// spinning waiters yield their core after a while so that it can run, and a step in which some wait came to that
// (the cores are oversubscribed) makes the next kBackoffSteps steps run on the caller alone.
class Team {
 public:
  // The process's team: every plan shares it, so the helpers of one model never spin while another decodes.
  static Team& shared() {
    static Team* team = new Team();  // never destroyed: its helpers sleep until the process ends
    return *team;
  }

  ~Team() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : helpers_)
      if (t.joinable()) (getpid() == pid_ ? t.join() : t.detach());
  }

  template <class F>
  void run(int nt, F&& f) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    // one thread, a concurrent step (another Python thread), a forked child (no helpers), or backing off
    if (nt <= 1 || !busy.owns_lock() || getpid() != pid_ || backoff_ > 0) {
      if (busy.owns_lock()) {
        backoff_ = std::max(0, backoff_ - 1);
        nt_ = 1;
      }
      Solo solo;
      f(0, 1);
      return;
    }
    stalled_.store(false, std::memory_order_relaxed);
    while (static_cast<int>(helpers_.size()) < nt - 1) {
      const int tid = static_cast<int>(helpers_.size()) + 1;
      helpers_.emplace_back([this, tid] { helper_main(tid); });
    }
    std::function<void(int, int)> fn(std::forward<F>(f));
    fn_ = &fn;
    nt_ = nt;
    done_.store(0, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(mu_);
      gen_.fetch_add(1, std::memory_order_release);
    }
    if (sleeping_.load(std::memory_order_acquire) > 0) cv_.notify_all();
    fn(0, nt);
    wait_until([&] { return done_.load(std::memory_order_acquire) == nt - 1; });
    if (stalled_.load(std::memory_order_relaxed)) backoff_ = kBackoffSteps;
  }

  // Steps left to run on one thread after a stalled one.
  int backoff() const { return backoff_; }

  void barrier() {
    if (nt_ <= 1 || Solo::active) return;
    const uint64_t g = bar_gen_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == nt_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      bar_gen_.fetch_add(1, std::memory_order_release);
      return;
    }
    wait_until([&] { return bar_gen_.load(std::memory_order_acquire) != g; });
  }

 private:
  template <class P>
  void wait_until(P ready) {
    if (ready()) return;
    const auto start = std::chrono::steady_clock::now();
    bool yielding = false;
    for (int spins = 1; !ready(); ++spins) {
      if (yielding) {
        std::this_thread::yield();
      } else {
        pause();
        if ((spins & 1023) == 0 && std::chrono::steady_clock::now() - start > kStall) {
          stalled_.store(true, std::memory_order_relaxed);
          yielding = true;
        }
      }
    }
  }

  static void pause() {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
  }

  void helper_main(int tid) {
    uint64_t seen = 0;
    for (;;) {
      // spin through the Python loop's gap between two tokens (kLinger), then sleep until the next step
      const auto start = std::chrono::steady_clock::now();
      for (int spins = 1; gen_.load(std::memory_order_acquire) == seen; ++spins) {
        pause();
        if ((spins & 255) == 0 && std::chrono::steady_clock::now() - start > kLinger) break;
      }
      if (gen_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lk(mu_);
        sleeping_.fetch_add(1, std::memory_order_acq_rel);
        cv_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen; });
        sleeping_.fetch_sub(1, std::memory_order_acq_rel);
      }
      if (stop_) return;
      seen = gen_.load(std::memory_order_acquire);
      if (tid < nt_) {
        (*fn_)(tid, nt_);
        done_.fetch_add(1, std::memory_order_release);
      }
    }
  }

  // Set on a thread that runs a step alone (its barriers are no-ops whatever the team does meanwhile).
  struct Solo {
    static thread_local bool active;
    bool was = active;
    Solo() { active = true; }
    ~Solo() { active = was; }
  };

  std::vector<std::thread> helpers_;
  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0}, bar_gen_{0};
  std::atomic<int> arrived_{0}, done_{0}, sleeping_{0};
  std::function<void(int, int)>* fn_ = nullptr;
  int nt_ = 1;
  bool stop_ = false;
  int backoff_ = 0;
  std::atomic<bool> stalled_{false};
  static constexpr std::chrono::microseconds kStall{1000};  // a wait this long: the other thread is not running
  static constexpr int kBackoffSteps = 4;  // measured: 4 steps beat 32 by ~10% of decode tok/s on this shared VM
  static constexpr std::chrono::microseconds kLinger{300};
  const pid_t pid_ = getpid();
};

thread_local bool Team::Solo::active = false;

class DecodePlan : public torch::CustomClassHolder {
 public:
  // dims = [hidden, heads, kv_heads, head_dim, intermediate, vocab]
  DecodePlan(std::vector<int64_t> dims, double eps, double scale) : eps_(eps), scale_(scale) {
    check(dims.size() == 6, "dims must be [hidden, heads, kv_heads, head_dim, intermediate, vocab]");
    hidden_ = dims[0], heads_ = dims[1], kvh_ = dims[2], hd_ = dims[3], inter_ = dims[4], vocab_ = dims[5];
    for (int64_t v : dims) check(v > 0, "every dimension must be positive");
    check(heads_ % kvh_ == 0, "heads must be a multiple of kv_heads");
    check(hd_ % 2 == 0, "head_dim must be even (rotary halves)");
    qkv_.resize((heads_ + 2 * kvh_) * hd_);
    gu_.resize(2 * inter_);
    out_.resize(hidden_);
    out2_.resize(hidden_);
    logits_.resize(vocab_);
  }

  int64_t add_bcq_linear(Tensor packed, Tensor alpha, OptTensor offset, OptTensor bias, int64_t m, int64_t k,
                         int64_t gs, std::string mode) {
    Lin l;
    l.packed = packed, l.alpha = alpha, l.m = m, l.k = k, l.gs = gs;
    check(packed.is_cpu() && packed.is_contiguous() && packed.scalar_type() == at::kByte, "packed must be uint8");
    if (alpha.scalar_type() == at::kByte) {  // cpu-lut4k: the alpha slot holds the block-scale codes
      check(packed.dim() == 4, "packed must be [Mt, NB, q, 128]");
      l.q = static_cast<int>(packed.size(2));
      check(alpha.is_cpu() && alpha.is_contiguous() && alpha.dim() == 2 &&
                alpha.size(0) == (m + QG_TILE_ROWS - 1) / QG_TILE_ROWS && alpha.size(1) == 128 + 48 * ((k + gs - 1) / gs),
            "cpu-lut4k block scales do not fit the matrix");
      check(!(offset.has_value() && offset->defined()), "cpu-lut4k weights carry their offsets in the block scales");
      l.kscales = true;
    } else {
      check(alpha.dim() == 4, "alpha must be [Mt, G, q, 32]");
      l.q = static_cast<int>(alpha.size(2));
      check(qg_biqgemm_alpha_floats(m, k, l.q, gs) == alpha.numel(), "alpha does not fit the matrix");
      check_f32(alpha, alpha.numel(), "alpha");
    }
    check(qg_biqgemm_packed_bytes(m, k, l.q, gs) == packed.numel(), "packed does not fit the matrix");
    if (offset.has_value() && offset->defined()) {
      check_f32(*offset, qg_biqgemm_offset_floats(m, k, gs), "offset");
      l.offset = *offset;
    }
    if (bias.has_value() && bias->defined()) {
      check_f32(*bias, m, "bias");
      l.bias = *bias;
    }
    check(mode == "exact" || mode == "fast", "mode must be 'exact' or 'fast'");
    l.mode = mode == "fast" ? QG_MODE_FAST : QG_MODE_EXACT;
    lins_.push_back(std::move(l));
    return static_cast<int64_t>(lins_.size()) - 1;
  }

  int64_t add_float_linear(Tensor weight, OptTensor bias) {
    Lin l;
    l.bcq = false;
    check(weight.dim() == 2, "a float Linear's weight must be [out, in]");
    l.m = weight.size(0), l.k = weight.size(1);
    check_f32(weight, l.m * l.k, "weight");
    l.weight = weight;
    if (bias.has_value() && bias->defined()) {
      check_f32(*bias, l.m, "bias");
      l.bias = *bias;
    }
    lins_.push_back(std::move(l));
    return static_cast<int64_t>(lins_.size()) - 1;
  }

  void add_layer(std::vector<int64_t> qkv, int64_t o, std::vector<int64_t> gate_up, int64_t down, Tensor in_norm,
                 Tensor post_norm) {
    Layer L;
    check_rows(qkv, hidden_, (heads_ + 2 * kvh_) * hd_, "q/k/v");
    check_rows(gate_up, hidden_, 2 * inter_, "gate/up");
    check_rows({o}, heads_ * hd_, hidden_, "o_proj");
    check_rows({down}, inter_, hidden_, "down_proj");
    check_f32(in_norm, hidden_, "input norm weight");
    check_f32(post_norm, hidden_, "post-attention norm weight");
    L.qkv = qkv, L.o = o, L.gate_up = gate_up, L.down = down, L.in_norm = in_norm, L.post_norm = post_norm;
    layers_.push_back(std::move(L));
  }

  void set_rope(Tensor cos, Tensor sin) {
    check(cos.dim() == 2 && cos.size(1) == hd_ && sin.sizes() == cos.sizes(), "cos and sin must be [positions, head_dim]");
    check_f32(cos, cos.numel(), "cos");
    check_f32(sin, sin.numel(), "sin");
    cos_ = cos, sin_ = sin;
  }

  // kind "float": table [vocab, hidden]; "cpu-lut4": a BiQGEMM weight (a tied head); "planes": canonical BCQ.
  // Nothing changes unless every check passes.
  void set_embedding(std::string kind, Tensor table, OptTensor alpha_in, OptTensor offset_in, int64_t gs) {
    const Tensor alpha = alpha_in.has_value() ? *alpha_in : Tensor();
    const Tensor offset = offset_in.has_value() ? *offset_in : Tensor();
    int64_t q = 0;
    if (kind == "float") {
      check_f32(table, vocab_ * hidden_, "embedding table");
    } else {
      check(kind == "cpu-lut4" || kind == "cpu-lut4k" || kind == "planes",
            "embedding kind must be 'float', 'cpu-lut4', 'cpu-lut4k' or 'planes'");
      check(alpha.defined() && table.is_cpu() && table.scalar_type() == at::kByte && table.is_contiguous(),
            "a BCQ embedding needs contiguous uint8 CPU codes and alpha");
      check(gs >= 1 && gs <= hidden_, "embedding group size out of range");
      const int64_t g = (hidden_ + gs - 1) / gs;
      if (kind == "cpu-lut4k") {
        check(table.dim() == 4, "cpu-lut4k codes must be [Mt, NB, q, 128]");
        q = table.size(2);
        check(q >= 1 && q <= 8 && qg_biqgemm_packed_bytes(vocab_, hidden_, q, gs) == table.numel(),
              "embedding codes do not fit");
        check(alpha.scalar_type() == at::kByte && alpha.is_contiguous() && alpha.dim() == 2 &&
                  alpha.size(0) == (vocab_ + QG_TILE_ROWS - 1) / QG_TILE_ROWS && alpha.size(1) == 128 + 48 * g,
              "embedding block scales do not fit");
      } else if (kind == "cpu-lut4") {
        check(alpha.dim() == 4, "cpu-lut4 alpha must be [Mt, G, q, 32]");
        q = alpha.size(2);
        check(q >= 1 && q <= 8 && qg_biqgemm_packed_bytes(vocab_, hidden_, q, gs) == table.numel(),
              "embedding codes do not fit");
        check_f32(alpha, qg_biqgemm_alpha_floats(vocab_, hidden_, q, gs), "embedding alpha");
        if (offset.defined()) check_f32(offset, qg_biqgemm_offset_floats(vocab_, hidden_, gs), "embedding offset");
      } else {
        check(alpha.dim() == 3, "planes alpha must be [q, vocab, G]");
        q = alpha.size(0);
        check(q >= 1 && q <= 8 && table.numel() == q * vocab_ * ((hidden_ + 7) / 8), "embedding planes do not fit");
        check_f32(alpha, q * vocab_ * g, "embedding alpha");
        if (offset.defined()) check_f32(offset, vocab_ * g, "embedding offset");
      }
    }
    emb_kind_ = kind, emb_ = table, emb_gs_ = gs, emb_q_ = q, emb_alpha_ = alpha, emb_offset_ = offset;
  }

  void set_head(int64_t lin, Tensor norm) {
    check_rows({lin}, hidden_, vocab_, "lm_head");
    check_f32(norm, hidden_, "final norm weight");
    head_ = lin, norm_ = norm;
  }

  // The static KV cache of layer i: [1, KVH, S, D] float32 (transformers StaticCache keys / values).
  void bind_cache(int64_t i, Tensor k, Tensor v) {
    check(i >= 0 && i < static_cast<int64_t>(layers_.size()), "no such layer");
    check(k.dim() == 4 && k.size(0) == 1 && k.size(1) == kvh_ && k.size(3) == hd_ && v.sizes() == k.sizes(),
          "cache tensors must be [1, kv_heads, positions, head_dim]");
    check_f32(k, k.numel(), "key cache");
    check_f32(v, v.numel(), "value cache");
    layers_[i].kc = k, layers_[i].vc = v;
  }

  Tensor logits(int64_t token, int64_t pos) {
    forward(token, pos);
    return at::from_blob(logits_.data(), {vocab_}, at::kFloat).clone();
  }

  int64_t step(int64_t token, int64_t pos) {
    forward(token, pos);
    const auto t0 = now();
    for (int64_t i : suppressed_) logits_[i] = -std::numeric_limits<float>::infinity();
    int64_t best = 0;
    float bv = logits_[0];
    for (int64_t i = 1; i < vocab_; ++i)
      if (logits_[i] > bv) bv = logits_[i], best = i;  // first maximum, as torch.argmax
    lap(t0, kArgmax);
    return best;
  }

  // Token ids `step` never returns (their logits count as -inf), e.g. the end tokens for a fixed-length run.
  void set_suppressed(std::vector<int64_t> ids) {
    for (int64_t i : ids) check(i >= 0 && i < vocab_, "suppressed token id " + std::to_string(i) + " out of range");
    suppressed_ = std::move(ids);
  }

  // Seconds spent since the last reset in [BiQGEMM / float Linears, attention (incl. rotary and the cache write),
  // everything else (embedding, norms, MLP gate, residuals), argmax], then the number of forwards.
  std::vector<double> timings() const { return {secs_[0], secs_[1], secs_[2], secs_[3], static_cast<double>(steps_)}; }
  void reset_timings() {
    std::fill(std::begin(secs_), std::end(secs_), 0.0);
    steps_ = 0;
  }

 private:
  void check_rows(const std::vector<int64_t>& ids, int64_t k, int64_t m, const char* what) const {
    int64_t rows = 0;
    for (int64_t i : ids) {
      check(i >= 0 && i < static_cast<int64_t>(lins_.size()), std::string(what) + ": no such Linear");
      check(lins_[i].k == k, std::string(what) + ": in_features " + std::to_string(lins_[i].k) + ", expected " +
                                 std::to_string(k));
      rows += lins_[i].m;
    }
    check(rows == m, std::string(what) + ": " + std::to_string(rows) + " output rows, expected " + std::to_string(m));
  }

  enum { kKernel = 0, kAttention = 1, kOther = 2, kArgmax = 3 };
  static std::chrono::steady_clock::time_point now() { return std::chrono::steady_clock::now(); }
  // Adds the time since t to bucket b and returns now (the step is timed in consecutive laps).
  std::chrono::steady_clock::time_point lap(std::chrono::steady_clock::time_point t, int b) {
    const auto n = now();
    secs_[b] += std::chrono::duration<double>(n - t).count();
    return n;
  }

  // Rows of Linear `id` that thread tid of nt computes: whole tiles of QG_TILE_ROWS, contiguous, so each thread
  // streams one run of the packed weight.
  void linear(int64_t id, const float* x, float* y, int tid, int nt) {
    const Lin& l = lins_[id];
    const int64_t tiles = (l.m + QG_TILE_ROWS - 1) / QG_TILE_ROWS;
    const int64_t t0 = tiles * tid / nt, t1 = tiles * (tid + 1) / nt;
    if (l.bcq) {
      const int rc = qg_biqgemm_lut_tiles(x, l.k, l.packed.data_ptr(), static_cast<const float*>(l.alpha.data_ptr()),
                                          l.offset.defined() ? l.offset.data_ptr<float>() : nullptr,
                                          l.bias.defined() ? l.bias.data_ptr<float>() : nullptr, l.m, l.q, l.gs,
                                          l.mode | (l.kscales ? QG_MODE_KSCALES : 0), t0, t1, y);
      if (rc != QG_OK) failed_.store(rc, std::memory_order_relaxed);
      return;
    }
    const float* w = l.weight.data_ptr<float>();
    const float* b = l.bias.defined() ? l.bias.data_ptr<float>() : nullptr;
    for (int64_t r = t0 * QG_TILE_ROWS; r < std::min(l.m, t1 * QG_TILE_ROWS); ++r)
      y[r] = dot_f32(w + r * l.k, x, l.k) + (b ? b[r] : 0.f);
  }

  void linears(const std::vector<int64_t>& ids, const float* x, float* y, int tid, int nt) {
    for (int64_t id : ids) {
      linear(id, x, y, tid, nt);
      y += lins_[id].m;
    }
  }

  // Attention item `item` (kv head g, position range `part`): the unnormalized sums of its rep query heads.
  void attend_item(int64_t item, const float* kc, const float* vc, int64_t S, int64_t n) {
    const int64_t D = hd_, rep = heads_ / kvh_, g = item / kParts, part = item % kParts;
    const int64_t per = (n + kParts - 1) / kParts;
    const int64_t s0 = std::min(n, part * per), s1 = std::min(n, s0 + per);
    float* o = part_out_.data() + item * rep * D;
    float* mx = part_m_.data() + item * rep;
    float* tot = part_l_.data() + item * rep;
    std::fill(o, o + rep * D, 0.f);
    std::fill(mx, mx + rep, -std::numeric_limits<float>::infinity());
    std::fill(tot, tot + rep, 0.f);
    if (s1 <= s0) return;
    float* score = part_score_.data() + item * rep * ((per + 15) / 16 * 16);
    attend_partial(qkv_.data() + g * rep * D, kc + (g * S + s0) * D, vc + (g * S + s0) * D, o, nullptr, s1 - s0, D,
                   rep, static_cast<float>(scale_), score, mx, tot);
  }

  // softmax(q kᵀ scale) v of every query head from the items' partial sums (flash-decoding's merge).
  void merge_attention(float* att) const {
    const int64_t D = hd_, rep = heads_ / kvh_;
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    for (int64_t g = 0; g < kvh_; ++g)
      for (int64_t r = 0; r < rep; ++r) {
        float m = kNegInf;
        for (int64_t part = 0; part < kParts; ++part) m = std::max(m, part_m_[(g * kParts + part) * rep + r]);
        float* out = att + (g * rep + r) * D;
        std::fill(out, out + D, 0.f);
        if (m == kNegInf) continue;
        float total = 0.f;
        for (int64_t part = 0; part < kParts; ++part) {
          const int64_t item = g * kParts + part;
          const float pm = part_m_[item * rep + r];
          if (pm == kNegInf) continue;
          const float w = std::exp(pm - m);
          total += w * part_l_[item * rep + r];
          axpy_f32(w, part_out_.data() + (item * rep + r) * D, out, D);
        }
        const float inv = 1.f / total;
        for (int64_t d = 0; d < D; ++d) out[d] *= inv;
      }
  }

  void embed(int64_t token, float* out) {
    const int64_t H = hidden_;
    if (emb_kind_ == "float") {
      std::memcpy(out, emb_.data_ptr<float>() + token * H, H * sizeof(float));
      return;
    }
    const int64_t gs = emb_gs_, G = (H + gs - 1) / gs, q = emb_q_;
    const uint8_t* codes = emb_.data_ptr<uint8_t>();
    if (emb_kind_ == "cpu-lut4k") {  // w = d c - m, c = sum_i bit_i 2^i (qgraph.quant.block_scaled)
      const int64_t t = token / QG_TILE_ROWS, r = token % QG_TILE_ROWS;
      const int64_t bpg = (gs + QG_BLOCK_K - 1) / QG_BLOCK_K, nb = G * bpg;
      const uint8_t* kt = emb_alpha_.data_ptr<uint8_t>() + t * (128 + 48 * G);
      const uint16_t* sup = reinterpret_cast<const uint16_t*>(kt);
      const float D = c10::detail::fp16_ieee_to_fp32_value(sup[r]);
      const float M = c10::detail::fp16_ieee_to_fp32_value(sup[QG_TILE_ROWS + r]);
      for (int64_t c = 0; c < H; ++c) {
        const int64_t g = c / gs, within = c % gs, b = g * bpg + within / QG_BLOCK_K, col = within % QG_BLOCK_K;
        const uint8_t* gb = kt + 128 + 48 * g;
        const int h = (gb[32 + (r & 15)] >> (4 * (r >> 4))) & 15;
        const float d = D * static_cast<float>((gb[r] & 15) | ((h & 3) << 4));
        const float mn = M * static_cast<float>((gb[r] >> 4) | ((h >> 2) << 4));
        int code = 0;
        for (int64_t i = 0; i < q; ++i)
          code |= ((codes[((t * nb + b) * q + i) * 4 * QG_TILE_ROWS + (col / 8) * QG_TILE_ROWS + r] >> (col % 8)) & 1)
                  << i;
        out[c] = d * static_cast<float>(code) - mn;
      }
      return;
    }
    const float* alpha = emb_alpha_.data_ptr<float>();
    const float* off = emb_offset_.defined() ? emb_offset_.data_ptr<float>() : nullptr;
    if (emb_kind_ == "planes") {  // planes [q, V, ceil(H/8)] LSB-first, alpha [q, V, G], offset [V, G]
      const int64_t kb = (H + 7) / 8;
      for (int64_t c = 0; c < H; ++c) {
        float v = 0.f;
        for (int64_t i = 0; i < q; ++i) {
          const bool bit = (codes[(i * vocab_ + token) * kb + c / 8] >> (c % 8)) & 1;
          const float a = alpha[(i * vocab_ + token) * G + c / gs];
          v += bit ? a : -a;
        }
        out[c] = off ? v + off[token * G + c / gs] : v;
      }
      return;
    }
    // cpu-lut4: byte [t][b][i][p][r], r = row in tile, p = 8-column chunk of block b; alpha [Mt][G][q][32]
    const int64_t t = token / QG_TILE_ROWS, r = token % QG_TILE_ROWS;
    const int64_t bpg = (gs + QG_BLOCK_K - 1) / QG_BLOCK_K, nb = G * bpg;
    for (int64_t c = 0; c < H; ++c) {
      const int64_t g = c / gs, within = c % gs, b = g * bpg + within / QG_BLOCK_K, col = within % QG_BLOCK_K;
      const int64_t p = col / 8, s = col % 8;
      float v = 0.f;
      for (int64_t i = 0; i < q; ++i) {
        const uint8_t byte = codes[((t * nb + b) * q + i) * 4 * QG_TILE_ROWS + p * QG_TILE_ROWS + r];
        const bool bit = (byte >> s) & 1;
        const float a = alpha[((t * G + g) * q + i) * QG_TILE_ROWS + r];
        v += bit ? a : -a;
      }
      out[c] = off ? v + off[(t * G + g) * QG_TILE_ROWS + r] : v;
    }
  }

  void forward(int64_t token, int64_t pos) {
    check(head_ >= 0 && emb_.defined() && cos_.defined(), "set_embedding, set_rope and set_head first");
    if (token < 0 || token >= vocab_) check(false, "token id " + std::to_string(token) + " out of range");
    if (pos < 0 || pos >= cos_.size(0)) check(false, "position " + std::to_string(pos) + " past the rotary table");
    check(!layers_.empty(), "add_layer first");
    for (const Layer& L : layers_) {
      if (!L.kc.defined() || pos >= L.kc.size(2))
        check(false, "position " + std::to_string(pos) + " past the bound KV cache");
      if (L.kc.size(2) != layers_[0].kc.size(2)) check(false, "every layer's KV cache must hold as many positions");
    }
    const int64_t n = pos + 1, rep = heads_ / kvh_, per = (n + kParts - 1) / kParts;
    part_out_.resize(kvh_ * kParts * rep * hd_);
    part_m_.resize(kvh_ * kParts * rep);
    part_l_.resize(kvh_ * kParts * rep);
    part_score_.resize(kvh_ * kParts * rep * ((per + 15) / 16 * 16));
    const int nt = std::max(1, std::min(at::get_num_threads(), kMaxThreads));
    while (static_cast<int>(bufs_.size()) < nt) {  // per-thread buffers, sized once
      bufs_.emplace_back();
      bufs_.back().resize(hidden_, heads_ * hd_, inter_);
    }
    ++steps_;
    failed_.store(QG_OK, std::memory_order_relaxed);
    Team::shared().run(nt, [&](int tid, int nthreads) { forward_thread(token, pos, tid, nthreads); });
    lap(last_, kKernel);
    const int rc = failed_.load(std::memory_order_relaxed);
    check(rc == QG_OK, "BiQGEMM failed with code " + std::to_string(rc));
  }

  // One token on thread tid of nt: every thread keeps its own residual stream and normed inputs (cheap to
  // compute twice), splits each Linear's rows and the attention items with the others, and meets them at a
  // barrier wherever it reads what they wrote. Thread 0 keeps the step's timers.
  void forward_thread(int64_t token, int64_t pos, int tid, int nt) {
    ThreadBufs& B = bufs_[tid];
    const bool timer = tid == 0;
    auto t = now();
    auto mark = [&](int bucket) {
      if (timer) t = lap(t, bucket);
    };
    const int64_t H = hidden_, D = hd_, NQ = heads_ * D, NK = kvh_ * D, S = layers_[0].kc.size(2), n = pos + 1;
    const float eps = static_cast<float>(eps_);
    float* x = B.x.data();
    float* h = B.h.data();
    embed(token, x);
    for (const Layer& L : layers_) {
      rmsnorm(x, L.in_norm.data_ptr<float>(), h, H, eps);
      mark(kOther);
      linears(L.qkv, h, qkv_.data(), tid, nt);
      Team::shared().barrier();
      mark(kKernel);
      float* kc = L.kc.data_ptr<float>();
      float* vc = L.vc.data_ptr<float>();
      if (tid == 0) {
        const float* cs = cos_.data_ptr<float>() + pos * D;
        const float* sn = sin_.data_ptr<float>() + pos * D;
        float* kv = qkv_.data() + NQ;
        rope(qkv_.data(), heads_, D, cs, sn);
        rope(kv, kvh_, D, cs, sn);
        for (int64_t g = 0; g < kvh_; ++g) {
          std::memcpy(kc + (g * S + pos) * D, kv + g * D, D * sizeof(float));
          std::memcpy(vc + (g * S + pos) * D, kv + NK + g * D, D * sizeof(float));
        }
      }
      Team::shared().barrier();
      for (int64_t item = tid; item < kvh_ * kParts; item += nt) attend_item(item, kc, vc, S, n);
      Team::shared().barrier();
      merge_attention(B.att.data());
      mark(kAttention);
      linear(L.o, B.att.data(), out_.data(), tid, nt);
      Team::shared().barrier();
      mark(kKernel);
      for (int64_t i = 0; i < H; ++i) x[i] += out_[i];
      rmsnorm(x, L.post_norm.data_ptr<float>(), h, H, eps);
      mark(kOther);
      linears(L.gate_up, h, gu_.data(), tid, nt);
      Team::shared().barrier();
      mark(kKernel);
      silu_mul(gu_.data(), gu_.data() + inter_, B.act.data(), inter_);
      mark(kOther);
      linear(L.down, B.act.data(), out2_.data(), tid, nt);
      Team::shared().barrier();
      mark(kKernel);
      for (int64_t i = 0; i < H; ++i) x[i] += out2_[i];
    }
    rmsnorm(x, norm_.data_ptr<float>(), h, H, eps);
    mark(kOther);
    linear(head_, h, logits_.data(), tid, nt);
    if (timer) {
      lap(t, kKernel);
      last_ = now();  // the team's join, after this, is kernel time too (see forward)
    }
  }

  double eps_, scale_;
  int64_t hidden_, heads_, kvh_, hd_, inter_, vocab_;
  std::vector<Lin> lins_;
  std::vector<Layer> layers_;
  Tensor cos_, sin_, norm_, emb_, emb_alpha_, emb_offset_;
  std::string emb_kind_;
  int64_t emb_gs_ = 0, emb_q_ = 0, head_ = -1;
  std::vector<int64_t> suppressed_;
  static constexpr int64_t kParts = 2;  // position ranges per kv head in the attention items
  static constexpr int kMaxThreads = 16;
  struct ThreadBufs {
    std::vector<float> x, h, att, act;  // residual stream, normed input, attention output, gated MLP input
    void resize(int64_t hidden, int64_t q_width, int64_t inter) {
      x.resize(hidden);
      h.resize(hidden);
      att.resize(q_width);
      act.resize(inter);
    }
  };
  std::vector<ThreadBufs> bufs_;
  std::vector<float> qkv_, gu_, out_, out2_, logits_;  // shared: each thread writes its rows
  std::vector<float> part_out_, part_m_, part_l_, part_score_;
  std::atomic<int> failed_{QG_OK};
  std::chrono::steady_clock::time_point last_;
  double secs_[4] = {0, 0, 0, 0};
  int64_t steps_ = 0;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(qgraph, m) {
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<std::vector<int64_t>, double, double>())
      .def("add_bcq_linear", &DecodePlan::add_bcq_linear)
      .def("add_float_linear", &DecodePlan::add_float_linear)
      .def("add_layer", &DecodePlan::add_layer)
      .def("set_rope", &DecodePlan::set_rope)
      .def("set_embedding", &DecodePlan::set_embedding)
      .def("set_head", &DecodePlan::set_head)
      .def("bind_cache", &DecodePlan::bind_cache)
      .def("logits", &DecodePlan::logits)
      .def("step", &DecodePlan::step)
      .def("set_suppressed", &DecodePlan::set_suppressed)
      .def("timings", &DecodePlan::timings)
      .def("reset_timings", &DecodePlan::reset_timings);
}
