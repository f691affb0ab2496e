// Every CPU kernel of nanomoe_ops under AddressSanitizer and UndefinedBehaviorSanitizer (make
// sanitize): forward and backward, every mixing and dtype, edge shapes and input layouts, 1 and 2
// threads, each result checked against a float64 reference in plain ATen so that a kernel the
// sanitizers leave alone must still compute the right thing. Bad arguments must be refused with an
// exception before any kernel runs. Exits nonzero on the first failure; the sanitizers abort on
// their first report.
//
//   sanitize_kernels               # the kernels this CPU runs (AMX on an AMX machine)
//   NANOMOE_AMX=0 sanitize_kernels # the same without AMX
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstdlib>
#include <functional>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using LinearFn = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const OptTensor&, const OptTensor&, const OptTensor&);

struct Shape {
  std::vector<int64_t> lead;  // the input's leading dimensions
  int64_t k_out, k_in, n_b, m_b, rank;
  bool bias;
};

// Empty batch, one token, odd sizes, one block, many blocks, two leading dimensions, sizes that
// reach the AMX bfloat16 tiles (32 columns) and span several 48-token tiles with a tail, and a few
// tokens against 16 weight rows and more (AMX with the weights in place); 16 blocks and more, odd
// counts, a rank straddling 32 columns (the bfloat16 scalar gate on AMX), an odd rank and an odd
// last product of tokens (the bfloat16 diagonal_outer gate's products over the rank and its
// gradients' over the tokens).
const std::vector<Shape> kShapes = {
    {{0}, 2, 3, 5, 4, 3, true},      {{1}, 1, 1, 7, 5, 2, false},    {{17}, 3, 2, 9, 11, 5, true},
    {{3, 5}, 2, 2, 6, 4, 4, true},   {{33}, 16, 16, 4, 4, 4, true},  {{97}, 4, 4, 16, 16, 8, false},
    {{130}, 2, 2, 64, 48, 32, true}, {{50}, 1, 3, 40, 70, 36, true}, {{9}, 2, 2, 40, 36, 18, true},
    {{40}, 17, 33, 3, 2, 24, true},  {{37}, 18, 16, 2, 3, 5, false},
};
const char* const kMixings[] = {"scalar", "diagonal", "diagonal_outer", "full"};
// x as given (contiguous), transposed, every other column of a wider tensor, or one row expanded.
const char* const kLayouts[] = {"contiguous", "transposed", "sliced", "expanded"};

struct Args {
  Tensor x, down, mix, up;
  OptTensor bias, mix_left, mix_right;

  std::vector<Tensor> present() const {
    std::vector<Tensor> all = {x, down, mix, up};
    for (const OptTensor& t : {bias, mix_left, mix_right}) {
      if (t) all.push_back(*t);
    }
    return all;
  }
};

[[noreturn]] void fail(const std::string& what) {
  std::cerr << "FAILED: " << what << "\n";
  std::exit(1);
}

Tensor lay_out(const Tensor& x, const std::string& layout) {
  const int64_t features = x.size(-1);
  const Tensor rows = x.reshape({-1, features});
  if (layout == "transposed") return rows.t().contiguous().t().view(x.sizes());
  if (layout == "sliced") {
    const Tensor wide = at::zeros({rows.size(0), 2 * features}, x.options());
    wide.slice(1, 0, 2 * features, 2).copy_(rows);
    return wide.slice(1, 0, 2 * features, 2).view(x.sizes());
  }
  if (layout == "expanded" && rows.size(0) > 0) return rows[0].expand_as(x);
  return x;
}

Args make_args(const Shape& s, const std::string& mixing, at::ScalarType dtype,
               const std::string& layout) {
  const auto rand = [&](std::vector<int64_t> shape) {
    return at::randn(shape, at::kDouble).to(dtype);
  };
  std::vector<int64_t> x_shape = s.lead;
  x_shape.push_back(s.k_in * s.n_b);
  Args a;
  a.x = lay_out(rand(x_shape), layout);
  a.down = rand({s.k_in, s.rank, s.n_b});
  a.up = rand({s.k_out, s.m_b, s.rank});
  if (mixing == "scalar") a.mix = rand({s.k_out, s.k_in});
  if (mixing == "diagonal" || mixing == "diagonal_outer") a.mix = rand({s.k_out, s.k_in, s.rank});
  if (mixing == "full") a.mix = rand({s.k_out, s.k_in, s.rank, s.rank});
  if (mixing == "diagonal_outer") {
    a.mix_left = rand({s.k_out, s.k_in, s.rank});
    a.mix_right = rand({s.k_out, s.k_in, s.rank});
  }
  if (s.bias) a.bias = rand({s.k_out * s.m_b});
  return a;
}

Args map(const Args& a, const std::function<Tensor(const Tensor&)>& f) {
  const auto opt = [&](const OptTensor& t) -> OptTensor { return t ? OptTensor(f(*t)) : t; };
  return {f(a.x), f(a.down), f(a.mix), f(a.up), opt(a.bias), opt(a.mix_left), opt(a.mix_right)};
}

// SPEC section 2 in ATen, in float64: the oracle.
Tensor reference(const Args& a) {
  const int64_t k_in = a.down.size(0), n_b = a.down.size(2);
  const Tensor hidden = at::einsum("tjn,jrn->tjr", {a.x.reshape({-1, k_in, n_b}), a.down});
  Tensor mixed;
  if (a.mix.dim() == 2) mixed = at::einsum("ij,tjr->tir", {a.mix, hidden});
  if (a.mix.dim() == 4) mixed = at::einsum("ijab,tjb->tia", {a.mix, hidden});
  if (a.mix.dim() == 3) {
    mixed = at::einsum("ijr,tjr->tir", {a.mix, hidden});
    if (a.mix_left) {
      const Tensor dots = at::einsum("ijr,tjr->tij", {*a.mix_right, hidden});
      mixed = mixed + at::einsum("tij,ijr->tir", {dots, *a.mix_left});
    }
  }
  std::vector<int64_t> out_shape(a.x.sizes().begin(), a.x.sizes().end());
  out_shape.back() = a.up.size(0) * a.up.size(1);
  const Tensor out = at::einsum("tir,imr->tim", {mixed, a.up}).reshape(out_shape);
  return a.bias ? out + *a.bias : out;
}

Tensor nanomoe_linear(const Args& a) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("nanomoe::linear", "").typed<LinearFn>();
  return op.call(a.x, a.down, a.mix, a.up, a.bias, a.mix_left, a.mix_right);
}

// The output and the gradients of every tensor that requires one (leaves: fresh detached copies
// that keep each tensor's layout).
std::vector<Tensor> forward_backward(const std::function<Tensor(const Args&)>& fn, const Args& a,
                                     const Tensor& grad_out, bool grad_x) {
  Args leaves = map(a, [](const Tensor& t) { return t.detach(); });
  std::vector<Tensor> inputs = leaves.present();
  for (size_t i = grad_x ? 0 : 1; i < inputs.size(); ++i) inputs[i].requires_grad_(true);
  const Tensor out = fn(leaves);
  std::vector<Tensor> wanted(inputs.begin() + (grad_x ? 0 : 1), inputs.end());
  std::vector<Tensor> results = {out.detach()};
  for (const Tensor& grad : torch::autograd::grad({out}, wanted, {grad_out})) {
    results.push_back(grad);
  }
  return results;
}

double tolerance(at::ScalarType dtype) {
  return dtype == at::kDouble ? 1e-10 : dtype == at::kFloat ? 1e-5 : 1e-2;
}

// Relative error in norm; bfloat16 against the magnitude of the terms (see tests/support.py).
void check(const Tensor& actual, const Tensor& expected, const Tensor& scale, at::ScalarType dtype,
           const std::string& what) {
  if (!actual.defined()) fail(what + ": no result");
  if (actual.sizes() != expected.sizes()) fail(what + ": wrong shape");
  if (actual.scalar_type() != dtype) fail(what + ": wrong dtype");
  const double size = (dtype == at::kBFloat16 ? scale : expected).norm().item<double>();
  const double error = (actual.to(at::kDouble) - expected).norm().item<double>();
  const double relative = size > 0 ? error / size : error;
  if (!(relative <= tolerance(dtype))) {
    fail(what + ": relative error " + std::to_string(relative));
  }
}

int run_case(const Shape& s, const std::string& mixing, at::ScalarType dtype,
             const std::string& layout, bool grad_x, const std::string& label) {
  const Args args = make_args(s, mixing, dtype, layout);
  const Args exact = map(args, [](const Tensor& t) { return t.to(at::kDouble); });
  const Args magnitude = map(exact, [](const Tensor& t) { return t.abs(); });
  const Tensor expected_out = reference(exact);
  const Tensor grad_out = at::randn(expected_out.sizes(), at::kDouble);

  const auto mine = forward_backward(nanomoe_linear, args, grad_out.to(dtype), grad_x);
  const auto expected = forward_backward(reference, exact, grad_out, grad_x);
  const auto scale = forward_backward(reference, magnitude, grad_out.abs(), grad_x);
  for (size_t i = 0; i < expected.size(); ++i) {
    check(mine[i], expected[i], scale[i], dtype,
          label + (i == 0 ? " out" : " grad " + std::to_string(i)));
  }
  return 1;
}

// Bad arguments: an exception, before any kernel reads out of bounds.
int check_refusals() {
  const Args good = make_args({{4}, 2, 2, 3, 3, 2, true}, "diagonal", at::kFloat, "contiguous");
  std::vector<std::pair<std::string, Args>> bad;
  bad.push_back({"x features", good});
  bad.back().second.x = at::randn({4, 7});
  bad.push_back({"mix shape", good});
  bad.back().second.mix = at::randn({2, 3, 2});
  bad.push_back({"dtype mix-up", good});
  bad.back().second.up = good.up.to(at::kDouble);
  bad.push_back({"bias length", good});
  bad.back().second.bias = at::randn({5});
  bad.push_back({"mix_left without mix_right", good});
  bad.back().second.mix_left = at::randn({2, 2, 2});
  for (const auto& [what, args] : bad) {
    bool refused = false;
    try {
      nanomoe_linear(args);
    } catch (const c10::Error&) {
      refused = true;
    }
    if (!refused) fail("accepted bad arguments: " + what);
  }
  return static_cast<int>(bad.size());
}

}  // namespace

int main() {
  at::manual_seed(0);
  int checked = check_refusals();
  const at::ScalarType dtypes[] = {at::kFloat, at::kDouble, at::kBFloat16};
  for (const int threads : {1, 2}) {
    at::set_num_threads(threads);
    for (const at::ScalarType dtype : dtypes) {
      for (const char* mixing : kMixings) {
        for (size_t shape = 0; shape < kShapes.size(); ++shape) {
          for (const char* layout : kLayouts) {
            for (const bool grad_x : {true, false}) {
              const std::string label = std::string(c10::toString(dtype)) + " " + mixing +
                                        " shape " + std::to_string(shape) + " " + layout +
                                        (grad_x ? "" : " (no grad_x)") + " threads " +
                                        std::to_string(threads);
              checked += run_case(kShapes[shape], mixing, dtype, layout, grad_x, label);
            }
          }
        }
      }
    }
  }
  std::cout << "sanitize_kernels: " << checked << " checks passed\n";
  return 0;
}
