#include "top_theta_gqa_op.h"

#include <string>
#include <vector>

#include "gqa_front_cpu.h"
#include "top_theta_cpu.h"

namespace topt::ort {

const char* const kGqaInputNames[kGqaNumInputs] = {
    "query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
    "cos_cache", "sin_cache", "position_ids", "thresholds", "threshold_lengths", "past_v_sum", "sdc_log_mass"};

ONNXTensorElementDataType GqaInputType(size_t index, ONNXTensorElementDataType t) {
  return index == kGqaQuery ? t : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // checked when read (names the input)
}

OrtCustomOpInputOutputCharacteristic GqaInputCharacteristic(size_t index) {
  const bool required = index == kGqaQuery || index == kGqaPastKey || index == kGqaPastValue || index == kGqaSeqlensK ||
                        index == kGqaThresholds || index == kGqaThresholdLengths;
  return required ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}

namespace {

int64_t AlignUp(int64_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace

GqaAttributes ParseGqaAttributes(const OrtKernelInfo* raw_info) {
  GqaAttributes g;
  g.base = ParseAttributes(raw_info, kGqaOpName);
  g.base.is_causal = true;
  g.base.kv_layout = KvLayout::kSharedBuffer;
  if (g.base.has_scale && g.base.scale == 0.f) g.base.has_scale = false;  // GQA's 0: 1/sqrt(D)
  const OrtKernelInfo* info = raw_info;
  const auto fail = [&](const char* name, const auto&... parts) { Fail(kGqaOpName, g.base.node_name, "attribute", name, parts...); };
  g.num_heads = IntAttribute(info, g.base, "num_heads", 0);
  g.kv_num_heads = IntAttribute(info, g.base, "kv_num_heads", 0);
  if (g.num_heads <= 0 || g.kv_num_heads <= 0 || g.num_heads % g.kv_num_heads)
    fail("num_heads", "num_heads = ", g.num_heads, " must be a positive multiple of kv_num_heads = ", g.kv_num_heads);
  const int64_t rotary = IntAttribute(info, g.base, "do_rotary", 0), interleaved = IntAttribute(info, g.base, "rotary_interleaved", 0);
  if (rotary != 0 && rotary != 1) fail("do_rotary", "expected 0 or 1, got ", rotary);
  if (interleaved != 0 && interleaved != 1) fail("rotary_interleaved", "expected 0 or 1, got ", interleaved);
  g.do_rotary = rotary == 1;
  g.rotary_interleaved = interleaved == 1;
  return g;
}

GqaCall GqaCallFromContext(OrtKernelContext* raw_context, const GqaAttributes& g, bool values_on_host) {
  Ort::KernelContext ctx(raw_context);
  const Attributes& a = g.base;
  const InputChecker c(a, kGqaInputNames, ctx);
  GqaCall call;
  TopThetaParams& p = call.p;
  GqaPrepParams& f = call.prep;

  const Tensor query = c.Get(kGqaQuery), key = c.Get(kGqaKey), value = c.Get(kGqaValue);
  if (query.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && query.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 &&
      query.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16)
    c.Fail(kGqaQuery, "expected float32, float16 or bfloat16");
  c.Shape(kGqaQuery, query, {-1, -1, -1}, "[B, S, W]");
  const int64_t B = query.shape[0], S = query.shape[1], W = query.shape[2], Hq = g.num_heads, Hkv = g.kv_num_heads;
  if (key.present != value.present) c.Fail(key.present ? kGqaValue : kGqaKey, "key and value must be given together");
  const int64_t width_heads = key.present ? Hq : Hq + 2 * Hkv;
  if (W % width_heads) c.Fail(kGqaQuery, "width ", W, " is not a multiple of ", width_heads, key.present ? " (num_heads)" : " (num_heads + 2·kv_num_heads: packed QKV)");
  const int64_t D = W / width_heads;
  if (D % 2) c.Fail(kGqaQuery, "head size ", D, " must be even");
  if (key.present) {
    c.Type(kGqaKey, key, query.type);
    c.Shape(kGqaKey, key, {B, S, Hkv * D}, "[B, S, kv_num_heads·D]");
    c.Type(kGqaValue, value, query.type);
    c.Shape(kGqaValue, value, {B, S, Hkv * D}, "[B, S, kv_num_heads·D]");
  }
  const Tensor past_k = c.Get(kGqaPastKey), past_v = c.Get(kGqaPastValue);
  c.Type(kGqaPastKey, past_k, query.type);
  c.Shape(kGqaPastKey, past_k, {B, Hkv, -1, D}, "[B, kv_num_heads, M, D]");
  const int64_t M = past_k.shape[2];
  c.Type(kGqaPastValue, past_v, query.type);
  c.Shape(kGqaPastValue, past_v, {B, Hkv, M, D}, "[B, kv_num_heads, M, D]");

  const Tensor seqlens = c.Get(kGqaSeqlensK);
  c.Type(kGqaSeqlensK, seqlens, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32);
  c.Shape(kGqaSeqlensK, seqlens, {B}, "[B]");
  const int32_t* seq = static_cast<const int32_t*>(seqlens.data);
  for (int64_t b = 0; values_on_host && b < B; ++b) {
    const int64_t past = std::max<int64_t>(int64_t(seq[b]) + 1 - S, 0);
    if (seq[b] < 0 || past + S > M)
      c.Fail(kGqaSeqlensK, "seqlens_k[", b, "] = ", seq[b], " out of range: the row's ", S,
             " new tokens must fit the buffer after its past (max(seqlens_k + 1 - S, 0) + S <= M = ", M, ")");
  }

  const Tensor cos = c.Get(kGqaCosCache), sin = c.Get(kGqaSinCache), positions = c.Get(kGqaPositionIds);
  if (g.do_rotary) {
    if (!cos.present || !sin.present) c.Fail(cos.present ? kGqaSinCache : kGqaCosCache, "required when do_rotary=1");
    c.Type(kGqaCosCache, cos, query.type);
    c.Shape(kGqaCosCache, cos, {-1, -1}, "[max_position, rotary_dim / 2]");
    c.Type(kGqaSinCache, sin, query.type);
    c.Shape(kGqaSinCache, sin, cos.shape, "[max_position, rotary_dim / 2] (as cos_cache)");
    f.max_position = cos.shape[0];
    f.rotary_dim = 2 * cos.shape[1];
    if (f.rotary_dim > D || f.rotary_dim == 0) c.Fail(kGqaCosCache, "rotary dim ", f.rotary_dim, " must be in [2, D = ", D, "]");
    f.cos_cache = cos.data;
    f.sin_cache = sin.data;
    f.rotary_interleaved = g.rotary_interleaved;
    if (positions.present) {
      c.Type(kGqaPositionIds, positions, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64);
      c.Shape(kGqaPositionIds, positions, {B, S}, "[B, S]");
      f.position_ids = static_cast<const int64_t*>(positions.data);
    }
    for (int64_t b = 0; values_on_host && b < B; ++b)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t pos = f.position_ids ? f.position_ids[b * S + s] : std::max<int64_t>(int64_t(seq[b]) + 1 - S, 0) + s;
        if (pos < 0 || pos >= f.max_position)
          c.Fail(f.position_ids ? kGqaPositionIds : kGqaSeqlensK, "position ", pos, " of row ", b,
                 " is outside the rotary cache (max_position = ", f.max_position, ")");
      }
  }

  p.dtype = f.dtype = ToDType(query.type);
  p.B = f.B = B, p.S = f.S = S, p.Skv = S, p.Hq = f.Hq = Hq, p.Hkv = f.Hkv = Hkv, p.Dh = p.Dv = f.D = D, p.P = M;
  f.query = query.data, f.key = key.data, f.value = value.data, f.seqlens_k = seq;
  p.past_key = past_k.data, p.past_value = past_v.data;

  ReadThresholdLengths(c, kGqaThresholdLengths, values_on_host, p);
  const Tensor thresholds = c.Get(kGqaThresholds);
  c.Type(kGqaThresholds, thresholds, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  c.Shape(kGqaThresholds, thresholds, {Hq, p.L}, "[num_heads, L]");
  p.thresholds = static_cast<const float*>(thresholds.data);
  const Tensor v_sum = c.Get(kGqaPastVSum);
  if (v_sum.present) {
    c.Type(kGqaPastVSum, v_sum, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    c.Shape(kGqaPastVSum, v_sum, {B, Hkv, D}, "[B, kv_num_heads, D]");
    p.past_v_sum = static_cast<const float*>(v_sum.data);
  }
  const Tensor log_mass = c.Get(kGqaSdcLogMass);
  if (a.sdc == Sdc::kCalibrated && !log_mass.present) c.Fail(kGqaSdcLogMass, "required when compensation has sdc_calibrated");
  if (log_mass.present) {
    c.Type(kGqaSdcLogMass, log_mass, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    c.Shape(kGqaSdcLogMass, log_mass, {Hq, p.L}, "[num_heads, L]");
    p.sdc_log_mass = static_cast<const float*>(log_mass.data);
  }
  ApplyAttributes(a, p);

  void* output = AllocateOutput(ctx, kY, {B, S, Hq * D});
  p.present_key = AllocateOutput(ctx, kPresentKey, {B, Hkv, M, D});
  p.present_value = AllocateOutput(ctx, kPresentValue, {B, Hkv, M, D});
  p.present_v_sum = static_cast<float*>(AllocateOutput(ctx, kPresentVSum, {B, Hkv, D}));
  p.stats = static_cast<int64_t*>(AllocateOutput(ctx, kStats, {B, Hq, kNumStats}));
  call.out = GqaOutputParams{p.dtype, B, S, Hq, D, nullptr, output};
  if (S == 1) p.y = output;  // [B, Hq, 1, D] and [B, 1, Hq·D] are the same memory

  const int64_t es = p.dtype == DType::kFloat32 ? 4 : 2;
  call.scratch_bytes = AlignUp(B * Hq * S * D * es) * (S == 1 ? 1 : 2) + 2 * AlignUp(B * Hkv * S * D * es) + AlignUp(B * 4);
  return call;
}

void PlaceGqaScratch(GqaCall& call, void* scratch) {
  TopThetaParams& p = call.p;
  const int64_t es = p.dtype == DType::kFloat32 ? 4 : 2;
  char* at = static_cast<char*>(scratch);
  const auto take = [&](int64_t bytes) { char* x = at; at += AlignUp(bytes); return x; };
  p.q = call.prep.q = take(p.B * p.Hq * p.S * p.Dh * es);
  p.k_new = call.prep.k = take(p.B * p.Hkv * p.S * p.Dh * es);
  p.v_new = call.prep.v = take(p.B * p.Hkv * p.S * p.Dh * es);
  int32_t* past = reinterpret_cast<int32_t*>(take(p.B * 4));
  p.past_seqlens = call.prep.past_seqlens = past;
  if (p.S != 1) p.y = take(p.B * p.Hq * p.S * p.Dh * es);
  call.out.y = p.y;
}

OrtStatusPtr TopThetaGqaCpuKernel::ComputeV2(OrtKernelContext* context) {
  return ToStatus([&] {
    GqaCall call = GqaCallFromContext(context, attributes, /*values_on_host=*/true);
    std::vector<char> scratch(size_t(call.scratch_bytes) + 256);
    PlaceGqaScratch(call, reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(scratch.data()) + 255) / 256 * 256));
    GqaPrepCpu(call.prep);
    RunTopThetaCpu(call.p);
    if (call.p.S != 1) GqaOutputCpu(call.out);
  });
}

}  // namespace topt::ort
