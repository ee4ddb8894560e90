// One exit of real early exit in one native call (CPU, float32): pool the representation,
// apply the IM's linear layer, divide by the temperature, compute the exit score or the JEI
// gate, decide who leaves and count them. It does in one call what the Python path does in 8
// to 25 PyTorch operations, each of which costs several microseconds of dispatch at batch 1
// (measured in benchmarks/exit_head_cost.py). Loaded and driven by jei/native_exits.py.
//
// Arithmetic is in float, as in the Python path, but in another order and with other
// exponential routines, so results agree with it to float rounding, not bit for bit: a score
// within rounding of its threshold may decide the other way.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

// Kept in step with jei/native_exits.py.
enum Pool : int64_t { kMap = 0, kTokens = 1, kVector = 2, kClassTokenNorm = 3 };
enum Rule : int64_t { kMaxProb = 0, kNegativeEntropy = 1, kGateLogit = 2, kGateProbability = 3, kJEI = 4 };
constexpr int64_t kBatchedLinear = 16;  // the batch size from which the IM's linear layer is one matrix product

// Sums [C] over `count` rows of a [count, C] block (rows contiguous): vectorises over C.
void add_rows(const float* rows, int64_t count, int64_t channels, float* sums) {
  for (int64_t row = 0; row < count; ++row) {
    const float* values = rows + row * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) sums[c] += values[c];
  }
}

// Sum of `count` contiguous floats: a SIMD reduction (omp simd allows the reordering, as
// torch's vectorised sum reorders it).
float sum_contiguous(const float* values, int64_t count) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < count; ++i) sum += values[i];
  return sum;
}

// The mean of channel c of sample `base` over rows [h0, h1) and columns [w0, w1) of a map.
float window_mean(const float* base, const at::Tensor& map, int64_t c, int64_t h0, int64_t h1, int64_t w0, int64_t w1) {
  const int64_t sc = map.stride(1), sh = map.stride(2), sw = map.stride(3);
  float sum = 0.0f;
  for (int64_t h = h0; h < h1; ++h)
    for (int64_t w = w0; w < w1; ++w) sum += base[c * sc + h * sh + w * sw];
  return sum / static_cast<float>((h1 - h0) * (w1 - w0));
}

// The pooled representation of sample b as jei.heads.ims.global_pool computes it: [C] (a map's
// spatial mean, the tokens' mean, the vector), or with grid > 1 a map's adaptive average pool
// to grid x grid cells, flattened channel-major as torch's flatten(1) orders it.
// The LayerNorm of sample b's class token (token 0 of [B, N, C], C contiguous) with per-channel
// weight and bias, as torch.nn.functional.layer_norm computes it (two-pass moments, in float).
struct ClassTokenNorm {
  const float* weight;
  const float* bias;
  float eps;
};

void class_token_norm(const float* token, int64_t channels, const ClassTokenNorm& norm, float* out) {
  const float mean = sum_contiguous(token, channels) / static_cast<float>(channels);
  float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
  for (int64_t c = 0; c < channels; ++c) squares += (token[c] - mean) * (token[c] - mean);
  const float inverse_std = 1.0f / std::sqrt(squares / static_cast<float>(channels) + norm.eps);
  for (int64_t c = 0; c < channels; ++c) out[c] = (token[c] - mean) * inverse_std * norm.weight[c] + norm.bias[c];
}

void pool_sample(const at::Tensor& features, int64_t pool, int64_t grid, int64_t b, float* pooled, int64_t channels,
                 const ClassTokenNorm& norm) {
  const float* base = features.data_ptr<float>() + b * features.stride(0);
  if (pool == kClassTokenNorm) {
    class_token_norm(base, channels, norm, pooled);
    return;
  }
  if (pool == kVector) {
    std::copy(base, base + channels, pooled);
    return;
  }
  if (pool == kMap && grid > 1) {  // adaptive pooling: cell i spans [floor(i H / g), ceil((i + 1) H / g))
    const int64_t channels = features.size(1), height = features.size(2), width = features.size(3);
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t i = 0; i < grid; ++i)
        for (int64_t j = 0; j < grid; ++j)
          pooled[(c * grid + i) * grid + j] =
              window_mean(base, features, c, i * height / grid, ((i + 1) * height + grid - 1) / grid, j * width / grid,
                          ((j + 1) * width + grid - 1) / grid);
    return;
  }
  std::fill(pooled, pooled + channels, 0.0f);
  int64_t count;
  if (pool == kTokens) {  // [B, N, C], C contiguous
    count = features.size(1);
    add_rows(base, count, channels, pooled);
  } else if (features.stride(1) == 1) {  // channels-last map [B, C, H, W] stored as [B, H, W, C]
    count = features.size(2) * features.size(3);
    add_rows(base, count, channels, pooled);
  } else {  // contiguous map: each channel's H x W values in a row
    count = features.size(2) * features.size(3);
    for (int64_t c = 0; c < channels; ++c) pooled[c] = sum_contiguous(base + c * count, count);
  }
  const float scale = 1.0f / static_cast<float>(count);
  for (int64_t c = 0; c < channels; ++c) pooled[c] *= scale;
}

// p = softmax(z) and log p (K exponentials, one logarithm).
void softmax(const float* logits, int64_t classes, std::vector<float>& probs, std::vector<float>& log_probs) {
  const float top = *std::max_element(logits, logits + classes);
  float total = 0.0f;
  for (int64_t k = 0; k < classes; ++k) total += probs[k] = std::exp(logits[k] - top);
  const float log_total = std::log(total), inverse = 1.0f / total;
  for (int64_t k = 0; k < classes; ++k) {
    probs[k] *= inverse;
    log_probs[k] = logits[k] - top - log_total;
  }
}

// -sum_k p_k log p_k with 0 log 0 = 0 (torch.special.entr).
float entropy(const std::vector<float>& probs, const std::vector<float>& log_probs) {
  float total = 0.0f;
  for (size_t k = 0; k < probs.size(); ++k)
    if (probs[k] > 0.0f) total -= probs[k] * log_probs[k];
  return total;
}

// The JEI gate's four features (paper §4.1; jei.heads.uncertainty.uncertainty_features):
// max p, H(p), the margin between the two largest p, and H(q) with q = softmax(2 log p), that is
// q_k = p_k^2 / sum_j p_j^2 (log q_k = 2 log p_k - log sum_j p_j^2: no more exponentials).
std::array<float, 4> uncertainty_features(const std::vector<float>& probs, const std::vector<float>& log_probs) {
  const int64_t classes = static_cast<int64_t>(probs.size());
  float first = 0.0f, second = 0.0f, squares = 0.0f;
  for (int64_t k = 0; k < classes; ++k) {
    squares += probs[k] * probs[k];
    if (probs[k] > first) {
      second = first;
      first = probs[k];
    } else if (probs[k] > second) {
      second = probs[k];
    }
  }
  if (classes == 1) second = 0.0f;  // one class: no runner-up
  const float log_squares = std::log(squares);
  float sharpened = 0.0f;
  for (int64_t k = 0; k < classes; ++k) {
    const float q = probs[k] * probs[k] / squares;
    if (q > 0.0f) sharpened -= q * (2.0f * log_probs[k] - log_squares);
  }
  return {first, entropy(probs, log_probs), first - second, sharpened};
}

// The staying samples' rows of `state` (those with leaves[s] false), in batch order: what
// index_select(0, staying positions) gives, in the same memory format. Undefined (the caller
// then selects them) when `state` is undefined or 0-d, not on the CPU, not batch-first, not a
// plain strided tensor (quantized, or a lazy conjugate or negative view, whose bytes are not
// its values), or when its samples are not each one contiguous block.
at::Tensor staying_rows(const at::Tensor& state, const std::vector<char>& leaves, int64_t staying) {
  const int64_t batch = static_cast<int64_t>(leaves.size());
  if (!state.defined() || state.dim() == 0 || state.size(0) != batch || !state.device().is_cpu()) return at::Tensor();
  if (state.layout() != at::kStrided || state.is_quantized() || state.is_conj() || state.is_neg()) return at::Tensor();
  // Channels-last exactly as jei.memory_format.is_channels_last says (select_rows keeps it so).
  bool channels_last = false;
  if (state.dim() == 4) {
    const int64_t c = state.size(1), h = state.size(2), w = state.size(3);
    const std::vector<int64_t> nhwc{h * w * c, 1, w * c, c}, nchw{c * h * w, h * w, w, 1};
    channels_last = state.strides().vec() == nhwc && nhwc != nchw;
  }
  if (!channels_last && !state.is_contiguous()) return at::Tensor();
  std::vector<int64_t> sizes = state.sizes().vec();
  sizes[0] = staying;
  at::Tensor rows = at::empty(sizes, state.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                                 : at::MemoryFormat::Contiguous));
  const int64_t row_bytes = state.numel() / batch * state.element_size();
  const char* source = static_cast<const char*>(state.data_ptr());
  char* target = static_cast<char*>(rows.data_ptr());
  for (int64_t s = 0, slot = 0; s < batch; ++s)
    if (!leaves[s]) std::memcpy(target + row_bytes * slot++, source + row_bytes * s, row_bytes);
  return rows;
}

}  // namespace

// features: the exit's representation (float32 CPU): [B, C, H, W] (contiguous or channels-last)
// for pool=map (grid: the IM's pool_size), [B, N, C] for tokens, [B, C] for vector; or, for
// class_token_norm, the backbone's tokens [B, N, C], whose class token's LayerNorm (norm_weight,
// norm_bias [C], norm_eps) is the representation a vector IM reads (otherwise those are empty). weight [K, C], bias [K]: the IM's
// linear layer. temperatures [G + 1]: every exit's (the network's buffer), index: this exit's. rule, threshold: the policy (see Rule;
// thresholds on its "higher is surer" scale). gate_weight [1, 4], gate_bias [1]: the JEI gate
// (rules that read it). used [B]: JEI's running gate sum (rule kJEI; otherwise empty). state:
// the backbone's state, to compact with the samples (batch first, any plain dtype; see
// staying_rows; empty: not compacted).
// Returns (logits [B, K], order, used after this exit, how many leave, the staying samples'
// state). When some but not all leave, `order` [B] lists the staying samples, then the leaving
// ones, each in batch order, and the logits and running gate sums come in that order, and the
// state is `state`'s rows of the staying samples (see staying_rows); otherwise `order` and that
// state are None and the logits and sums are in batch order.
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t, at::Tensor> exit_step(
    const at::Tensor& features, int64_t pool, int64_t grid, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& temperatures, int64_t index,
    int64_t rule, double threshold, const at::Tensor& gate_weight, const at::Tensor& gate_bias, const at::Tensor& used,
    const at::Tensor& state, const at::Tensor& norm_weight, const at::Tensor& norm_bias, double norm_eps) {
  // Every tensor's device and dtype, once: the checks below are about shapes.
  for (const at::Tensor* tensor : {&features, &weight, &bias, &temperatures, &gate_weight, &gate_bias, &used, &norm_weight, &norm_bias})
    TORCH_CHECK(!tensor->defined() || tensor->numel() == 0 || (tensor->device().is_cpu() && tensor->scalar_type() == at::kFloat),
                "native exits run on float32 CPU tensors; got ", tensor->scalar_type(), " on ", tensor->device());
  TORCH_CHECK(pool >= kMap && pool <= kClassTokenNorm && rule >= kMaxProb && rule <= kJEI && grid >= 1,
              "native exits: bad pool, grid or rule code");
  const int64_t dims = pool == kMap ? 4 : pool == kVector ? 2 : 3;
  TORCH_CHECK(features.dim() == dims, "native exits: expected a ", dims, "-d representation, got ", features.dim(), "-d");
  at::Tensor input = features;
  const bool rows_contiguous = pool == kMap ? (features.is_contiguous() || features.is_contiguous(at::MemoryFormat::ChannelsLast))
                                            : features.stride(dims - 1) == 1 && (pool != kTokens || features.stride(1) == features.size(2));
  if (!rows_contiguous) input = features.contiguous();
  // The pooled width: C, or C x grid x grid for a map pooled to a grid.
  const int64_t grid_cells = pool == kMap ? grid * grid : 1;
  const int64_t batch = input.size(0), channels = input.size(pool == kMap ? 1 : dims - 1) * grid_cells;
  const int64_t classes = weight.size(0);
  TORCH_CHECK(bias.numel() == weight.size(0), "native exits: the IM's linear layer must have one bias per class");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == channels, "native exits: the IM's weight is not [K, ", channels, "]");
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  const bool reads_gate = rule == kGateLogit || rule == kGateProbability || rule == kJEI;
  at::Tensor gw, gb;
  if (reads_gate) {
    TORCH_CHECK(gate_weight.numel() == 4 && gate_bias.numel() == 1, "native exits: the gate must be a Linear(4, 1)");
    gw = gate_weight.contiguous();
    gb = gate_bias.contiguous();
  }
  TORCH_CHECK(rule != kJEI || used.numel() == batch, "native exits: JEI's running gate sum must have one value per sample");
  at::Tensor nw, nb;
  if (pool == kClassTokenNorm) {
    TORCH_CHECK(input.size(1) >= 1, "native exits: the class token's LayerNorm needs at least one token");
    TORCH_CHECK(norm_weight.numel() == input.size(2) && norm_bias.numel() == input.size(2),
                "native exits: the class token's LayerNorm needs one weight and one bias per channel");
    nw = norm_weight.contiguous();
    nb = norm_bias.contiguous();
  }
  const ClassTokenNorm norm{pool == kClassTokenNorm ? nw.data_ptr<float>() : nullptr,
                            pool == kClassTokenNorm ? nb.data_ptr<float>() : nullptr, static_cast<float>(norm_eps)};
  TORCH_CHECK(index >= 0 && index < temperatures.numel(), "native exits: no temperature for exit ", index);
  const float temperature = temperatures.contiguous().data_ptr<float>()[index];
  const float limit = static_cast<float>(threshold);  // compared in float, as torch compares a float tensor
  const float* weights = w.data_ptr<float>();
  const float* biases = b.data_ptr<float>();
  const float* gate_params = reads_gate ? gw.data_ptr<float>() : nullptr;
  const float gate_bias_value = reads_gate ? gb.data_ptr<float>()[0] : 0.0f;
  const at::Tensor used_before = rule == kJEI ? used.contiguous() : used;

  // Ordinary tensors even under inference mode: the caller gets them as they are.
  c10::InferenceMode ordinary_outputs(false);
  at::Tensor logits = at::empty({batch, classes}, input.options());
  at::Tensor used_after = rule == kJEI ? at::empty({batch}, input.options()) : used;
  std::vector<char> leaves(batch);  // who leaves (char, not bool: threads write their own samples)
  // Samples are independent: split them over torch's threads once a share is worth a thread.
  const int64_t per_sample = std::max<int64_t>(1, input.numel() / std::max<int64_t>(1, batch));
  const int64_t grain = std::max<int64_t>(1, 32768 / per_sample);
  // From kBatchedLinear samples on, the linear layer is one BLAS product over the pooled batch,
  // as F.linear computes it (8x faster than a dot product per sample and class on a ViT exit
  // at batch 256); below that, the per-sample loop costs less than the product's dispatch.
  const bool batched = batch >= kBatchedLinear;
  if (batched) {
    at::Tensor pooled = pool == kVector ? input : at::empty({batch, channels}, input.options());
    if (pool != kVector) {
      float* rows = pooled.data_ptr<float>();
      at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
        for (int64_t s = begin; s < end; ++s) pool_sample(input, pool, grid, s, rows + s * channels, channels, norm);
      });
    }
    at::NoGradGuard no_graph;  // the IM's parameters require grad: no graph for the caller
    at::addmm_out(logits, b, pooled, w.t());
  }
  float* out = logits.data_ptr<float>();
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> pooled(batched ? 0 : channels), probs(classes), log_probs(classes);
    for (int64_t s = begin; s < end; ++s) {
      float* z = out + s * classes;
      if (!batched) {
        pool_sample(input, pool, grid, s, pooled.data(), channels, norm);
        for (int64_t k = 0; k < classes; ++k) {
          float total = 0.0f;
          const float* row = weights + k * channels;
#pragma omp simd reduction(+ : total)
          for (int64_t c = 0; c < channels; ++c) total += row[c] * pooled[c];
          z[k] = total + biases[k];
        }
      }
      if (temperature != 1.0f)
        for (int64_t k = 0; k < classes; ++k) z[k] = z[k] / temperature;
      // A NaN or +inf logit makes every score NaN in Python (log_softmax), and a NaN never
      // passes a threshold: such a sample stays, and JEI's running sum becomes NaN (so it never
      // leaves later either). -inf logits are ordinary zero probabilities, except to the
      // entropy score, which Python computes as 0 * -inf = NaN.
      bool defined = true, minus_infinity = false;
      for (int64_t k = 0; k < classes; ++k) {
        defined = defined && !std::isnan(z[k]) && z[k] != std::numeric_limits<float>::infinity();
        minus_infinity = minus_infinity || z[k] == -std::numeric_limits<float>::infinity();
      }
      if (!defined || (rule == kNegativeEntropy && minus_infinity)) {
        leaves[s] = false;
        if (rule == kJEI) used_after.data_ptr<float>()[s] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      if (rule == kMaxProb) {  // max_k p_k = 1 / sum_k exp(z_k - max z): no logarithm, no division per class
        const float top = *std::max_element(z, z + classes);
        float total = 0.0f;
        for (int64_t k = 0; k < classes; ++k) total += std::exp(z[k] - top);
        leaves[s] = 1.0f / total >= limit;
        continue;
      }
      softmax(z, classes, probs, log_probs);
      if (rule == kNegativeEntropy) {
        leaves[s] = -entropy(probs, log_probs) >= limit;
        continue;
      }
      const auto f = uncertainty_features(probs, log_probs);
      const float gate_logit =
          gate_params[0] * f[0] + gate_params[1] * f[1] + gate_params[2] * f[2] + gate_params[3] * f[3] + gate_bias_value;
      const float gate = 1.0f / (1.0f + std::exp(-gate_logit));
      if (rule == kGateLogit) {
        leaves[s] = gate_logit >= limit;
      } else if (rule == kGateProbability) {
        leaves[s] = gate >= limit;
      } else {  // JEI's rule (jei.exits.leaves_now): leave when g_l >= r / 2, r = 1 - sum_{k<l} g_k > 0
        const float sum_before = used_before.data_ptr<float>()[s];
        const float remaining = 1.0f - sum_before;
        leaves[s] = remaining > 0.0f && gate >= 0.5f * remaining;
        used_after.data_ptr<float>()[s] = sum_before + gate;
      }
    }
  });
  int64_t count = 0;
  for (int64_t s = 0; s < batch; ++s) count += leaves[s];
  if (count == 0 || count == batch) return {logits, at::Tensor(), used_after, count, at::Tensor()};  // nothing to compact
  // Some leave: the staying samples first, then the leaving ones, each in batch order (what a
  // stable argsort of `leaving` gives), with their logits and running gate sums in that order.
  at::Tensor order = at::empty({batch}, input.options().dtype(at::kLong));
  at::Tensor ordered_logits = at::empty_like(logits);
  at::Tensor ordered_used = rule == kJEI ? at::empty_like(used_after) : used_after;
  int64_t* positions = order.data_ptr<int64_t>();
  float* ordered = ordered_logits.data_ptr<float>();
  int64_t next_stay = 0, next_leave = batch - count;
  for (int64_t s = 0; s < batch; ++s) {
    const int64_t slot = leaves[s] ? next_leave++ : next_stay++;
    positions[slot] = s;
    std::copy(out + s * classes, out + (s + 1) * classes, ordered + slot * classes);
    if (rule == kJEI) ordered_used.data_ptr<float>()[slot] = used_after.data_ptr<float>()[s];
  }
  return {ordered_logits, order, ordered_used, count, staying_rows(state, leaves, batch - count)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("exit_step", &exit_step, "One exit of real early exit: IM, score or gate, decision, order, count");
}
