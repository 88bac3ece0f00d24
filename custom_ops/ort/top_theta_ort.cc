#include "top_theta_ort.h"

#include <cmath>
#include <sstream>
#include <vector>

namespace topt::ort {

const char* const kInputNames[kNumInputs] = {
    "Q", "K", "V", "attn_mask", "past_key", "past_value",
    "thresholds", "threshold_lengths", "past_seqlens", "past_v_sum", "sdc_log_mass"};
const char* const kOutputNames[kNumOutputs] = {"Y", "present_key", "present_value", "present_v_sum", "stats"};

ONNXTensorElementDataType InputType(size_t index, ONNXTensorElementDataType t) {
  return index == kQ ? t : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}

ONNXTensorElementDataType OutputType(size_t index, ONNXTensorElementDataType t) {
  switch (index) {
    case kPresentVSum: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    case kStats: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    default: return t;
  }
}

OrtCustomOpInputOutputCharacteristic InputCharacteristic(size_t index) {
  const bool required = index == kQ || index == kK || index == kV || index == kThresholds ||
                        index == kThresholdLengths;
  return required ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}

OrtCustomOpInputOutputCharacteristic OutputCharacteristic(size_t index) {
  return index == kY ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}

DType ToDType(ONNXTensorElementDataType t) {
  return t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? DType::kFloat16
         : t == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16 ? DType::kBFloat16
                                                         : DType::kFloat32;
}

namespace {

const char* TypeName(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    default: return "another type";
  }
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

// --- attributes ------------------------------------------------------------------------------

// An attribute's value, or `fallback` when the node does not set it. ORT reports "absent" and
// "wrong type" through the same status: tell them apart by the message it has used since 1.x.
template <typename V>
V Attribute(const Ort::ConstKernelInfo& info, const Attributes& a, const char* name, V fallback) {
  try {
    return info.GetAttribute<V>(name);
  } catch (const Ort::Exception& e) {
    if (std::string(e.what()).find("No attribute with name") != std::string::npos) return fallback;
    Fail(a.op_name, a.node_name, "attribute", name, e.what());
  }
}

}  // namespace

int64_t IntAttribute(const OrtKernelInfo* info, const Attributes& a, const char* name, int64_t fallback) {
  return Attribute<int64_t>(Ort::ConstKernelInfo(info), a, name, fallback);
}

namespace {

bool HasAttribute(const Ort::ConstKernelInfo& info, const char* name) {
  try {
    info.GetAttribute<float>(name);
    return true;
  } catch (const Ort::Exception& e) {
    return std::string(e.what()).find("No attribute with name") == std::string::npos;
  }
}

}  // namespace

Attributes ParseAttributes(const OrtKernelInfo* raw_info, const char* op_name) {
  Ort::ConstKernelInfo info(raw_info);
  Attributes a;
  a.op_name = op_name;
  a.node_name = info.GetNodeName();
  auto fail = [&a](const char* attribute, const auto&... parts) {
    Fail(a.op_name, a.node_name, "attribute", attribute, parts...);
  };

  a.has_scale = HasAttribute(info, "scale");
  if (a.has_scale) a.scale = Attribute<float>(info, a, "scale", 0.f);

  const int64_t is_causal = Attribute<int64_t>(info, a, "is_causal", 0);
  if (is_causal != 0 && is_causal != 1) fail("is_causal", "expected 0 or 1, got ", is_causal);
  a.is_causal = is_causal == 1;

  a.k = Attribute<int64_t>(info, a, "k", 0);
  if (a.k < 0) fail("k", "expected >= 0, got ", a.k);

  const std::string placement = Attribute<std::string>(info, a, "placement", "post_softmax");
  if (placement == "post_softmax") a.placement = Placement::kPostSoftmax;
  else if (placement == "pre_softmax") a.placement = Placement::kPreSoftmax;
  else fail("placement", "expected post_softmax or pre_softmax, got '", placement, "'");

  // compensation: none, or +-joined tokens; at most one sdc_*, and sdc_* needs pre_softmax.
  const std::string compensation = Attribute<std::string>(info, a, "compensation", "vmc");
  a.vmc = false;
  std::string sdc_token;
  if (compensation != "none") {
    std::istringstream tokens(compensation);
    for (std::string t; std::getline(tokens, t, '+');) {
      if (t.empty()) continue;
      Sdc sdc = Sdc::kNone;
      if (t == "vmc") { a.vmc = true; continue; }
      if (t == "sdc_exact") sdc = Sdc::kExact;
      else if (t == "sdc_exp_threshold") sdc = Sdc::kExpThreshold;
      else if (t == "sdc_calibrated") sdc = Sdc::kCalibrated;
      else fail("compensation", "unknown token '", t,
                "' (expected none or +-joined vmc, sdc_exact, sdc_exp_threshold, sdc_calibrated)");
      if (a.sdc != Sdc::kNone) fail("compensation", "at most one sdc_* token, got ", sdc_token, " and ", t);
      a.sdc = sdc;
      sdc_token = t;
    }
  }
  if (a.sdc != Sdc::kNone && a.placement != Placement::kPreSoftmax) {
    fail("compensation", sdc_token, " needs placement=pre_softmax, got ", placement);
  }

  const std::string layout = Attribute<std::string>(info, a, "kv_layout", "concat");
  if (layout == "concat") a.kv_layout = KvLayout::kConcat;
  else if (layout == "shared_buffer") a.kv_layout = KvLayout::kSharedBuffer;
  else fail("kv_layout", "expected concat or shared_buffer, got '", layout, "'");

  a.calibrated_max_length = Attribute<int64_t>(info, a, "calibrated_max_length", 0);
  const int64_t dense_prompt = Attribute<int64_t>(info, a, "dense_prompt", 0);
  if (dense_prompt != 0 && dense_prompt != 1) fail("dense_prompt", "expected 0 or 1, got ", dense_prompt);
  a.dense_prompt = dense_prompt == 1;
  return a;
}

// --- inputs ----------------------------------------------------------------------------------

Tensor InputChecker::Get(size_t index) const {
  Tensor t;
  if (index >= ctx_.GetInputCount()) return t;
  Ort::ConstValue value = ctx_.GetInput(index);
  if (!value) return t;
  auto info = value.GetTensorTypeAndShapeInfo();
  t.present = true;
  t.type = info.GetElementType();
  t.shape = info.GetShape();
  t.data = value.GetTensorRawData();
  return t;
}

void InputChecker::Type(size_t index, const Tensor& t, ONNXTensorElementDataType expected) const {
  if (t.type != expected) Fail(index, "expected ", TypeName(expected), ", got ", TypeName(t.type));
}

void InputChecker::Shape(size_t index, const Tensor& t, const std::vector<int64_t>& expected, const char* letters) const {
  bool ok = t.shape.size() == expected.size();
  for (size_t i = 0; ok && i < expected.size(); ++i) ok = expected[i] < 0 || expected[i] == t.shape[i];
  if (ok) return;
  std::ostringstream want;
  want << letters;
  bool known = false;
  for (int64_t d : expected) known |= d >= 0;
  if (known) {
    want << " = [";
    for (size_t i = 0; i < expected.size(); ++i) {
      want << (i ? ", " : "");
      if (expected[i] < 0) want << '?'; else want << expected[i];
    }
    want << ']';
  }
  Fail(index, "expected shape ", want.str(), ", got ", ShapeText(t.shape));
}

void* AllocateOutput(Ort::KernelContext& ctx, size_t index, const std::vector<int64_t>& shape) {
  if (index >= ctx.GetOutputCount()) return nullptr;
  Ort::UnownedValue value = ctx.GetOutput(index, shape);
  if (!value) return nullptr;
  return value.GetTensorMutableRawData();
}

void ReadAttentionInputs(const InputChecker& c, const Attributes& a, TopThetaParams& p) {
  // Q, K, V: [B, Hq, S, Dh], [B, Hkv, Skv, Dh], [B, Hkv, Skv, Dv].
  const Tensor q = c.Get(kQ), k = c.Get(kK), v = c.Get(kV);
  // Each op instance is registered for its T, so ORT has already matched Q's type; this catches
  // only a bug in the table.
  if (q.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && q.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 &&
      q.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16) {
    c.Fail(kQ, "expected float32, float16 or bfloat16, got ", TypeName(q.type));
  }
  c.Shape(kQ, q, {-1, -1, -1, -1}, "[B, Hq, S, Dh]");
  p.dtype = ToDType(q.type);
  p.B = q.shape[0];
  p.Hq = q.shape[1];
  p.S = q.shape[2];
  p.Dh = q.shape[3];
  c.Type(kK, k, q.type);
  c.Shape(kK, k, {p.B, -1, -1, p.Dh}, "[B, Hkv, Skv, Dh]");
  p.Hkv = k.shape[1];
  p.Skv = k.shape[2];
  if (p.Hkv <= 0 || p.Hq % p.Hkv != 0) {
    c.Fail(kK, "Hq = ", p.Hq, " (Q) must be a positive multiple of Hkv = ", p.Hkv);
  }
  c.Type(kV, v, q.type);
  c.Shape(kV, v, {p.B, p.Hkv, p.Skv, -1}, "[B, Hkv, Skv, Dv]");
  p.Dv = v.shape[3];
  p.q = q.data;
  p.k_new = k.data;
  p.v_new = v.data;

  // Past KV: concat [B, Hkv, P, ·] (optional); shared_buffer [B, Hkv, M, ·] (required).
  const Tensor past_k = c.Get(kPastKey), past_v = c.Get(kPastValue);
  const bool shared = a.kv_layout == KvLayout::kSharedBuffer;
  if (past_k.present != past_v.present) {
    c.Fail(past_k.present ? kPastValue : kPastKey, "past_key and past_value must be given together");
  }
  if (shared && !past_k.present) c.Fail(kPastKey, "required when kv_layout=shared_buffer");
  if (shared && p.Skv != p.S) c.Fail(kK, "kv_layout=shared_buffer needs Skv = S = ", p.S, ", got Skv = ", p.Skv);
  if (past_k.present) {
    c.Type(kPastKey, past_k, q.type);
    c.Shape(kPastKey, past_k, {p.B, p.Hkv, -1, p.Dh}, shared ? "[B, Hkv, M, Dh]" : "[B, Hkv, P, Dh]");
    p.P = past_k.shape[2];
    c.Type(kPastValue, past_v, q.type);
    c.Shape(kPastValue, past_v, {p.B, p.Hkv, p.P, p.Dv}, shared ? "[B, Hkv, M, Dv]" : "[B, Hkv, P, Dv]");
  }
  p.past_key = past_k.data;
  p.past_value = past_v.data;
  p.kv_layout = a.kv_layout;
  const int64_t Ttot = p.total_kv();

  // attn_mask: bool or T, rank 2-4, broadcast to [B, Hq, S, Ttot] from the right.
  const Tensor mask = c.Get(kAttnMask);
  if (mask.present) {
    if (shared) c.Fail(kAttnMask, "must be absent when kv_layout=shared_buffer");
    if (mask.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL) p.mask_kind = MaskKind::kBool;
    else if (mask.type == q.type) p.mask_kind = MaskKind::kFloat;
    else c.Fail(kAttnMask, "expected bool or ", TypeName(q.type), " (the type of Q), got ", TypeName(mask.type));
    const size_t rank = mask.shape.size();
    if (rank < 2 || rank > 4) c.Fail(kAttnMask, "expected rank 2 to 4, got shape ", ShapeText(mask.shape));
    const int64_t target[4] = {p.B, p.Hq, p.S, Ttot};
    int64_t strides[4] = {0, 0, 0, 0};
    int64_t stride = 1;
    for (int axis = 3; axis >= 4 - int(rank); --axis) {
      const int64_t dim = mask.shape[size_t(axis - (4 - int(rank)))];
      if (dim != target[axis] && dim != 1) {
        c.Fail(kAttnMask, "shape ", ShapeText(mask.shape), " is not broadcastable to [B, Hq, S, Ttot] = ",
               ShapeText({p.B, p.Hq, p.S, Ttot}));
      }
      strides[axis] = dim == 1 ? 0 : stride;
      stride *= dim;
    }
    p.mask = mask.data;
    p.mask_stride_b = strides[0];
    p.mask_stride_h = strides[1];
    p.mask_stride_s = strides[2];
    p.mask_stride_t = strides[3];
  }
}

void ReadThresholdLengths(const InputChecker& c, size_t index, bool values_on_host, TopThetaParams& p) {
  const Tensor lengths = c.Get(index);
  c.Type(index, lengths, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64);
  c.Shape(index, lengths, {-1}, "[L]");
  p.L = lengths.shape[0];
  if (p.L < 1) c.Fail(index, "needs L >= 1 lengths, got shape ", ShapeText(lengths.shape));
  const int64_t* len = static_cast<const int64_t*>(lengths.data);
  for (int64_t i = 0; values_on_host && i < p.L; ++i) {
    if (len[i] < 0) c.Fail(index, "expected lengths >= 0, got ", len[i], " at ", i);
    if (i > 0 && len[i] <= len[i - 1]) {
      c.Fail(index, "expected strictly increasing lengths, got ", len[i - 1], " then ", len[i], " at ", i);
    }
  }
  p.threshold_lengths = len;
}

void ApplyAttributes(const Attributes& a, TopThetaParams& p) {
  p.scale = a.has_scale ? a.scale : 1.f / std::sqrt(float(p.Dh));
  p.is_causal = a.is_causal;
  p.k = a.dense_prompt && p.S > 1 ? INT64_MAX : a.k;  // after the inputs: S is known
  p.placement = a.placement;
  p.sdc = a.sdc;
  p.vmc = a.vmc;
  p.kv_layout = a.kv_layout;
  p.calibrated_max_length = a.calibrated_max_length;
}

TopThetaParams ParamsFromContext(OrtKernelContext* raw_context, const Attributes& a, bool values_on_host) {
  Ort::KernelContext ctx(raw_context);
  const InputChecker c(a, kInputNames, ctx);
  TopThetaParams p;
  ReadAttentionInputs(c, a, p);

  const Tensor seqlens = c.Get(kPastSeqlens);
  if (a.kv_layout == KvLayout::kSharedBuffer) {
    if (!seqlens.present) c.Fail(kPastSeqlens, "required when kv_layout=shared_buffer");
    c.Type(kPastSeqlens, seqlens, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32);
    c.Shape(kPastSeqlens, seqlens, {p.B}, "[B]");
    if (values_on_host) {
      const int32_t* lens = static_cast<const int32_t*>(seqlens.data);
      for (int64_t b = 0; b < p.B; ++b) {
        if (lens[b] < 0 || lens[b] + p.S > p.P) {
          c.Fail(kPastSeqlens, "past_seqlens[", b, "] = ", lens[b], " out of range: needs 0 <= past_seqlens[b] and past_seqlens[b] + S <= M (S = ", p.S, ", M = ", p.P, ")");
        }
      }
    }
    p.past_seqlens = static_cast<const int32_t*>(seqlens.data);
  } else if (seqlens.present) {
    c.Fail(kPastSeqlens, "only for kv_layout=shared_buffer; omit it with kv_layout=concat");
  }

  // Row lengths [L] (they define L) and thresholds [Hq, L].
  ReadThresholdLengths(c, kThresholdLengths, values_on_host, p);
  const Tensor thresholds = c.Get(kThresholds);
  c.Type(kThresholds, thresholds, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  c.Shape(kThresholds, thresholds, {p.Hq, p.L}, "[Hq, L]");
  p.thresholds = static_cast<const float*>(thresholds.data);

  const Tensor v_sum = c.Get(kPastVSum);
  if (v_sum.present) {
    c.Type(kPastVSum, v_sum, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    c.Shape(kPastVSum, v_sum, {p.B, p.Hkv, p.Dv}, "[B, Hkv, Dv]");
    p.past_v_sum = static_cast<const float*>(v_sum.data);
  }

  const Tensor log_mass = c.Get(kSdcLogMass);
  if (a.sdc == Sdc::kCalibrated && !log_mass.present) c.Fail(kSdcLogMass, "required when compensation has sdc_calibrated");
  if (log_mass.present) {
    c.Type(kSdcLogMass, log_mass, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    c.Shape(kSdcLogMass, log_mass, {p.Hq, p.L}, "[Hq, L]");
    p.sdc_log_mass = static_cast<const float*>(log_mass.data);
  }
  ApplyAttributes(a, p);

  // Outputs.
  const int64_t Ttot = p.total_kv();
  p.y = AllocateOutput(ctx, kY, {p.B, p.Hq, p.S, p.Dv});
  p.present_key = AllocateOutput(ctx, kPresentKey, {p.B, p.Hkv, Ttot, p.Dh});
  p.present_value = AllocateOutput(ctx, kPresentValue, {p.B, p.Hkv, Ttot, p.Dv});
  p.present_v_sum = static_cast<float*>(AllocateOutput(ctx, kPresentVSum, {p.B, p.Hkv, p.Dv}));
  p.stats = static_cast<int64_t*>(AllocateOutput(ctx, kStats, {p.B, p.Hq, kNumStats}));
  return p;
}

}  // namespace topt::ort
