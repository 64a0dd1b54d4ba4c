// A tiny custom op for the tests: y = x + 1 on float32, with a CPU kernel only.
//
// It has no GPU kernel on purpose, so `mpsserve audit-ops` must list it as a CPU fallback.
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/common_shape_fns.h"

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;

REGISTER_OP("MpsserveAddOne")
    .Input("x: float")
    .Output("y: float")
    .SetShapeFn(tensorflow::shape_inference::UnchangedShape)
    .Doc("Adds one to every element (mpsserve's test op; CPU kernel only).");

class AddOneOp : public OpKernel {
 public:
  explicit AddOneOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& input = context->input(0);
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, input.shape(), &output));
    auto in = input.flat<float>();
    auto out = output->flat<float>();
    for (int64_t i = 0; i < in.size(); ++i) out(i) = in(i) + 1.0f;
  }
};

REGISTER_KERNEL_BUILDER(Name("MpsserveAddOne").Device(DEVICE_CPU), AddOneOp);
