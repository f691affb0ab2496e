#include "checks.h"

#include <c10/util/Exception.h>

#include "operator_io.h"

namespace nanomoe {
namespace {

void check_same_placement(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "nanomoe.linear: ", name, " has dtype ",
                   t.scalar_type(), " but x has dtype ", x.scalar_type(),
                   "; all tensors must share one dtype");
  TORCH_CHECK(t.device() == x.device(), "nanomoe.linear: ", name, " is on ", t.device(),
              " but x is on ", x.device(), "; all tensors must be on one device");
}

Mixing read_mixing(const at::Tensor& mix, bool has_left, bool has_right) {
  TORCH_CHECK_VALUE(has_left == has_right,
                    "nanomoe.linear: mix_left and mix_right come together (diagonal_outer "
                    "mixing) or not at all; got only ",
                    has_left ? "mix_left" : "mix_right");
  if (has_left) {
    TORCH_CHECK_VALUE(mix.dim() == 3,
                      "nanomoe.linear: diagonal_outer mixing needs a 3-D mix (K_out, K_in, rank) "
                      "but mix has shape ",
                      mix.sizes());
    return Mixing::kDiagonalOuter;
  }
  switch (mix.dim()) {
    case 2:
      return Mixing::kScalar;
    case 3:
      return Mixing::kDiagonal;
    case 4:
      return Mixing::kFull;
    default:
      TORCH_CHECK_VALUE(false,
                        "nanomoe.linear: mix must be (K_out, K_in) for scalar, (K_out, K_in, rank) "
                        "for diagonal or (K_out, K_in, rank, rank) for full mixing, but has shape ",
                        mix.sizes());
  }
}

}  // namespace

void check_placement(const at::Tensor& x, const at::Tensor& down, const at::Tensor& mix,
                     const at::Tensor& up, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& mix_left,
                     const std::optional<at::Tensor>& mix_right) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()),
                   "nanomoe.linear: x must be floating point, ", "got ", x.scalar_type());
  check_same_placement(x, down, "down");
  check_same_placement(x, mix, "mix");
  check_same_placement(x, up, "up");
  if (bias) check_same_placement(x, *bias, "bias");
  if (mix_left) check_same_placement(x, *mix_left, "mix_left");
  if (mix_right) check_same_placement(x, *mix_right, "mix_right");
}

LinearDims check_linear_args(const at::Tensor& x, const at::Tensor& down, const at::Tensor& mix,
                             const at::Tensor& up, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& mix_left,
                             const std::optional<at::Tensor>& mix_right) {
  check_placement(x, down, mix, up, bias, mix_left, mix_right);

  TORCH_CHECK_VALUE(down.dim() == 3,
                    "nanomoe.linear: down must be (K_in, rank, in_features / K_in) ",
                    "but has shape ", down.sizes());
  TORCH_CHECK_VALUE(up.dim() == 3,
                    "nanomoe.linear: up must be (K_out, out_features / K_out, rank) ",
                    "but has shape ", up.sizes());
  LinearDims dims{};
  dims.in_blocks = down.size(0);
  dims.rank = down.size(1);
  dims.in_block = down.size(2);
  dims.out_blocks = up.size(0);
  dims.out_block = up.size(1);
  dims.in_features = dims.in_blocks * dims.in_block;
  dims.out_features = dims.out_blocks * dims.out_block;
  TORCH_CHECK_VALUE(dims.in_blocks >= 1 && dims.rank >= 1 && dims.in_block >= 1,
                    "nanomoe.linear: down must have at least one block, rank >= 1 and a nonempty "
                    "block width, but has shape ",
                    down.sizes());
  TORCH_CHECK_VALUE(
      dims.out_blocks >= 1 && dims.out_block >= 1,
      "nanomoe.linear: up must have at least one block and a nonempty block width, but "
      "has shape ",
      up.sizes());
  TORCH_CHECK_VALUE(up.size(2) == dims.rank, "nanomoe.linear: down has rank ", dims.rank,
                    " (its dim 1) but up has rank ", up.size(2), " (its dim 2)");
  TORCH_CHECK_VALUE(x.dim() >= 1, "nanomoe.linear: x must have at least one dimension");
  TORCH_CHECK_VALUE(x.size(-1) == dims.in_features, "nanomoe.linear: x has ", x.size(-1),
                    " features in its last dimension but down expects ", dims.in_features, " (",
                    dims.in_blocks, " blocks of ", dims.in_block, ")");

  dims.mixing = read_mixing(mix, mix_left.has_value(), mix_right.has_value());
  const int64_t k_out = dims.out_blocks, k_in = dims.in_blocks, r = dims.rank;
  std::vector<int64_t> want{k_out, k_in};
  if (dims.mixing != Mixing::kScalar) want.push_back(r);
  if (dims.mixing == Mixing::kFull) want.push_back(r);
  TORCH_CHECK_VALUE(mix.sizes() == at::IntArrayRef(want), "nanomoe.linear: mix must have shape ",
                    at::IntArrayRef(want), " (K_out, K_in",
                    dims.mixing == Mixing::kScalar ? "" : ", rank",
                    dims.mixing == Mixing::kFull ? ", rank" : "", ") but has shape ", mix.sizes());
  if (dims.mixing == Mixing::kDiagonalOuter) {
    TORCH_CHECK_VALUE(mix_left->sizes() == mix.sizes(), "nanomoe.linear: mix_left must have shape ",
                      mix.sizes(), " like mix, but has shape ", mix_left->sizes());
    TORCH_CHECK_VALUE(mix_right->sizes() == mix.sizes(),
                      "nanomoe.linear: mix_right must have shape ", mix.sizes(),
                      " like mix, but has shape ", mix_right->sizes());
  }
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == dims.out_features,
                      "nanomoe.linear: bias must have shape (", dims.out_features,
                      ",) but has shape ", bias->sizes());
  }
  dims.tokens = x.numel() / dims.in_features;
  return dims;
}

void check_backward_args(const LinearDims& dims, const at::Tensor& x, const at::Tensor& grad_out,
                         const at::Tensor& hidden, bool wants_outer_grads) {
  check_same_placement(x, grad_out, "grad_out");
  check_same_placement(x, hidden, "hidden");
  const std::vector<int64_t> out_shape = output_shape(x, dims.out_features);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_shape),
                    "nanomoe.linear_backward: grad_out must have shape ",
                    at::IntArrayRef(out_shape), " but has shape ", grad_out.sizes());
  const std::vector<int64_t> hidden_shape{dims.tokens, dims.in_blocks, dims.rank};
  TORCH_CHECK_VALUE(hidden.sizes() == at::IntArrayRef(hidden_shape),
                    "nanomoe.linear_backward: hidden must have shape ",
                    at::IntArrayRef(hidden_shape), " but has shape ", hidden.sizes());
  TORCH_CHECK_VALUE(!wants_outer_grads || dims.mixing == Mixing::kDiagonalOuter,
                    "nanomoe.linear_backward: gradients of mix_left / mix_right asked for, but the "
                    "mixing is not diagonal_outer");
}

void check_cpu_dtype(const at::Tensor& x) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
                   "nanomoe.linear on CPU supports float32, float64 and bfloat16, got ", dtype);
}

void check_cuda_dtype(const at::Tensor& x) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "nanomoe.linear on CUDA supports float32, float16 and bfloat16, got ", dtype);
}

}  // namespace nanomoe
