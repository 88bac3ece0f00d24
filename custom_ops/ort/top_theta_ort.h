// ORT glue shared by every TopThetaAttention op class (CPU, CUDA): the op's signature, its
// attributes, and the TopThetaParams filled from an OrtKernelContext. docs/op.md is the contract.
// TopThetaCalibrate (top_theta_calibrate_op.h) reuses the attributes and the input pieces below.
// Errors throw Ort::Exception(ORT_INVALID_ARGUMENT) naming the node and the input or attribute;
// the op classes turn them into an OrtStatus (ToStatus), so Python gets an exception, never a crash.
#pragma once
#include <sstream>
#include <string>
#include <vector>

#include "onnxruntime_cxx_api.h"
#include "top_theta_params.h"

namespace topt::ort {

inline constexpr const char* kDomain = "ai.topt";
inline constexpr const char* kOpName = "TopThetaAttention";

// Inputs and outputs, in op.md's order.
enum InputIndex : size_t {
  kQ, kK, kV, kAttnMask, kPastKey, kPastValue, kThresholds, kThresholdLengths, kPastSeqlens,
  kPastVSum, kSdcLogMass, kNumInputs
};
enum OutputIndex : size_t { kY, kPresentKey, kPresentValue, kPresentVSum, kStats, kNumOutputs };
extern const char* const kInputNames[kNumInputs];
extern const char* const kOutputNames[kNumOutputs];

// The op's signature for element type T. Only Q is declared T: ORT picks the per-T op instance by
// Q's type. Every other input is declared UNDEFINED (any type) and checked in ParamsFromContext,
// so a wrong dtype is an error that names the input (ORT's own says only "no implementation").
ONNXTensorElementDataType InputType(size_t index, ONNXTensorElementDataType t);
ONNXTensorElementDataType OutputType(size_t index, ONNXTensorElementDataType t);
OrtCustomOpInputOutputCharacteristic InputCharacteristic(size_t index);
OrtCustomOpInputOutputCharacteristic OutputCharacteristic(size_t index);

// The attributes, parsed and validated once per node (at session creation).
struct Attributes {
  const char* op_name = kOpName;  // the op type, for error messages
  std::string node_name;
  bool has_scale = false;  // absent: 1/sqrt(Dh)
  float scale = 0.f;
  bool is_causal = false;
  int64_t k = 0;
  Placement placement = Placement::kPostSoftmax;
  Sdc sdc = Sdc::kNone;
  bool vmc = true;
  KvLayout kv_layout = KvLayout::kConcat;
  int64_t calibrated_max_length = 0;
  bool dense_prompt = false;  // a call with S > 1 keeps every key (k becomes unbounded for it)
};
Attributes ParseAttributes(const OrtKernelInfo* info, const char* op_name = kOpName);

// Validates the inputs, allocates the requested outputs and fills the params.
// `values_on_host`: threshold_lengths and past_seqlens are host memory, so their values are
// checked too (increasing; in range). A CUDA op that keeps them on the device passes false.
TopThetaParams ParamsFromContext(OrtKernelContext* context, const Attributes& attributes,
                                 bool values_on_host = true);

DType ToDType(ONNXTensorElementDataType t);

// --- pieces shared by the ops' parsers (TopThetaAttention, TopThetaCalibrate) ------------------

// Throws Ort::Exception(ORT_INVALID_ARGUMENT): "<op> node '<node>': <kind> '<what>': <parts>".
template <typename... Parts>
[[noreturn]] void Fail(const char* op, const std::string& node, const char* kind, const char* what,
                       const Parts&... parts) {
  std::ostringstream out;
  out << op << " node '" << node << "': " << kind << " '" << what << "': ";
  (out << ... << parts);
  throw Ort::Exception(out.str(), ORT_INVALID_ARGUMENT);
}

struct Tensor {
  bool present = false;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  const void* data = nullptr;
};

// Reads a node's inputs; every error names the node and the input (`input_names`: the op's table).
class InputChecker {
 public:
  InputChecker(const Attributes& a, const char* const* input_names, Ort::KernelContext& ctx)
      : a_(a), names_(input_names), ctx_(ctx) {}

  Tensor Get(size_t index) const;
  template <typename... Parts>
  [[noreturn]] void Fail(size_t index, const Parts&... parts) const {
    topt::ort::Fail(a_.op_name, a_.node_name, "input", names_[index], parts...);
  }
  void Type(size_t index, const Tensor& t, ONNXTensorElementDataType expected) const;
  // Checks the shape against `expected`; -1 entries are free.
  void Shape(size_t index, const Tensor& t, const std::vector<int64_t>& expected, const char* letters) const;

 private:
  const Attributes& a_;
  const char* const* names_;
  Ort::KernelContext& ctx_;
};

// Inputs 0-5 (Q, K, V, attn_mask, past_key, past_value), whose indices both ops share: sizes,
// dtype, pointers and mask strides into p.
void ReadAttentionInputs(const InputChecker& c, const Attributes& a, TopThetaParams& p);
// threshold_lengths at `index`: int64 [L], L >= 1 (and, when on the host, >= 0 and increasing).
void ReadThresholdLengths(const InputChecker& c, size_t index, bool values_on_host, TopThetaParams& p);
// The attributes into p (scale defaults to 1/sqrt(Dh), so after ReadAttentionInputs).
void ApplyAttributes(const Attributes& a, TopThetaParams& p);
// The output's buffer, or nullptr when the node does not request it.
void* AllocateOutput(Ort::KernelContext& ctx, size_t index, const std::vector<int64_t>& shape);

// An int attribute, or `fallback` when the node does not set it (errors name the node).
int64_t IntAttribute(const OrtKernelInfo* info, const Attributes& a, const char* name, int64_t fallback);

// Runs `body`, turning any exception into an OrtStatus (nullptr on success).
template <typename F>
OrtStatusPtr ToStatus(F&& body) noexcept {
  try {
    body();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
}

// The op class of every (signature, kernel) pair the library registers. `Signature`: kName,
// kInputs, kOutputs and the static InputType/OutputType(index, T) and
// Input/OutputCharacteristic(index) of docs/op.md's table; `Kernel`: a static
// Create(const OrtKernelInfo*) parsing the attributes, and ComputeV2(OrtKernelContext*).
// InputMemoryType(index): OrtMemTypeCPUInput for an input the op never reads on the device (no
// Memcpy node feeds it, which also keeps the graph capturable by ORT's CUDA graphs).
template <typename Signature, typename Kernel>
struct Op : Ort::CustomOpBase<Op<Signature, Kernel>, Kernel, /*WithStatus=*/true> {
  Op(ONNXTensorElementDataType t, const char* execution_provider) : type_(t), ep_(execution_provider) {}

  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return ToStatus([&] { *kernel = Kernel::Create(info); });
  }
  const char* GetName() const { return Signature::kName; }
  const char* GetExecutionProviderType() const { return ep_; }

  size_t GetInputTypeCount() const { return Signature::kInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const { return Signature::InputType(i, type_); }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const { return Signature::InputCharacteristic(i); }
  size_t GetOutputTypeCount() const { return Signature::kOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t i) const { return Signature::OutputType(i, type_); }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const { return Signature::OutputCharacteristic(i); }
  OrtMemType GetInputMemoryType(size_t i) const { return Signature::InputMemoryType(i); }

 private:
  ONNXTensorElementDataType type_;
  const char* ep_;
};

inline constexpr const char* kCpuProvider = "CPUExecutionProvider";
inline constexpr const char* kCudaProvider = "CUDAExecutionProvider";

// TopThetaAttention's signature (the functions above).
struct AttentionSignature {
  static constexpr const char* kName = kOpName;
  static constexpr size_t kInputs = kNumInputs, kOutputs = kNumOutputs;
  static ONNXTensorElementDataType InputType(size_t i, ONNXTensorElementDataType t) { return ort::InputType(i, t); }
  static ONNXTensorElementDataType OutputType(size_t i, ONNXTensorElementDataType t) { return ort::OutputType(i, t); }
  static OrtCustomOpInputOutputCharacteristic InputCharacteristic(size_t i) { return ort::InputCharacteristic(i); }
  static OrtCustomOpInputOutputCharacteristic OutputCharacteristic(size_t i) { return ort::OutputCharacteristic(i); }
  static OrtMemType InputMemoryType(size_t) { return OrtMemTypeDefault; }
};

}  // namespace topt::ort
