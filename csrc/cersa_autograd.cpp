// Autograd of cersa::linear in C++ (docs/design.md "Forward" and "Backward"; CERSA,
// arXiv 2605.08174, Sec. 3).
//
//   cersa::linear(x, U, S, Vh, A?, B?, bias?, scale) -> y      y = x (U diag(S) Vh + s B A)^T + bias
//
// is the differentiable op the "cpp" and "cuda" backends run in eager mode.  Its Autograd kernel is
// a torch::autograd::Function whose forward calls cersa::linear_forward and whose backward calls
// cersa::linear_backward, both through the dispatcher below the autograd keys, so one autograd
// serves the CPU kernels (cpu/) and the CUDA kernels (cuda/, the _C_cuda extension).  Doing the
// autograd here rather than in a Python torch.autograd.Function takes the Python interpreter out of
// the backward: at N = 1 on a 384x384 layer that is most of the per-call time.
//
// What is saved (as the Python autograd in cersa_kernels/ops.py saves it): x only when dVh or dA
// is needed; h_k = s x A^T (N, k) only when dB is; xv = x Vh^T (N, r) only when dU or dS is.
// The backward is once-differentiable: under create_graph=True its results carry a node that
// raises when differentiated (a second derivative through the saved intermediates would be wrong).
// Forward-mode AD and functorch transforms are refused (torch::autograd::Function raises), never
// silently given a zero tangent.
#include <ATen/FuncTorchTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <array>
#include <tuple>

namespace cersa {
namespace {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSig = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
    const optional<Tensor>&, const optional<Tensor>&, double, bool);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
    const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
    double, std::array<bool, 7>);

const c10::TypedOperatorHandle<ForwardSig>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cersa::linear_forward", "")
                             .typed<ForwardSig>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cersa::linear_backward", "")
                             .typed<BackwardSig>();
  return op;
}

inline optional<Tensor> opt(const Tensor& t) {
  return t.defined() ? optional<Tensor>(t) : std::nullopt;
}

// Saved-variable slots, in save_for_backward order.
enum Slot { kX = 0, kHk, kXv, kU, kS, kVh, kA, kB };

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  // needs_input_grad per argument position 0..6 (false for an absent optional tensor).
  static std::array<bool, 7> needs_of(AutogradContext* ctx, bool has_A, bool has_B, bool has_bias) {
    const bool present[7] = {true, true, true, true, has_A, has_B, has_bias};
    std::array<bool, 7> need{};
    size_t edge = 0;
    for (size_t i = 0; i < 7; ++i)
      if (present[i]) need[i] = ctx->needs_input_grad(edge++);
    return need;
  }

  // Argument positions: x 0, U 1, S 2, Vh 3, A 4, B 5, bias 6, then scale and `executable` (not
  // tensors).  The context's needs_input_grad counts only the tensors given (an absent A, B or bias
  // has no edge), so positions map to edges through needs_of().  executable: whether a graph node
  // is being made (grad mode on and some input requires grad); without one there are no edges.
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& U, const Tensor& S,
                        const Tensor& Vh, const optional<Tensor>& A, const optional<Tensor>& B,
                        const optional<Tensor>& bias, double scale, bool executable) {
    const bool has_A = A.has_value() && A->defined(), has_B = B.has_value() && B->defined();
    const bool has_bias = bias.has_value() && bias->defined();
    const auto need = executable ? needs_of(ctx, has_A, has_B, has_bias) : std::array<bool, 7>{};
    const bool has_delta = has_A && has_B;
    const bool save_xv = need[1] || need[2];
    const bool keep_x = need[3] || need[4];
    const bool keep_hk = need[5];
    Tensor y, h_k, xv;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(y, h_k, xv) = forward_op().call(x, U, S, Vh, A, B, bias, scale, save_xv);
    }
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["has_A"] = has_A;
    ctx->saved_data["has_B"] = has_B;
    ctx->saved_data["has_bias"] = has_bias;
    ctx->save_for_backward({keep_x ? x : Tensor(), keep_hk && has_delta ? h_k : Tensor(),
                            save_xv ? xv : Tensor(), U, S, Vh, has_delta ? *A : Tensor(),
                            has_delta ? *B : Tensor()});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const bool has_A = ctx->saved_data["has_A"].toBool(), has_B = ctx->saved_data["has_B"].toBool();
    const auto needs = needs_of(ctx, has_A, has_B, ctx->saved_data["has_bias"].toBool());
    variable_list out(9);  // one slot per forward argument; scale's and executable's stay undefined
    bool any = false;
    for (bool f : needs) any = any || f;
    if (!any) return out;
    const auto saved = ctx->get_saved_variables();
    Tensor dx, dU, dS, dVh, dA, dB, dbias;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(dx, dU, dS, dVh, dA, dB, dbias) = backward_op().call(
          grad_outputs[0], opt(saved[kX]), opt(saved[kHk]), opt(saved[kXv]), saved[kU], saved[kS],
          saved[kVh], opt(saved[kA]), opt(saved[kB]), ctx->saved_data["scale"].toDouble(), needs);
    }
    const std::array<Tensor*, 7> grads = {&dx, &dU, &dS, &dVh, &dA, &dB, &dbias};
    for (size_t i = 0; i < 7; ++i)
      if (needs[i]) out[i] = *grads[i];
    if (torch::autograd::GradMode::is_enabled()) {
      // create_graph=True: the gradients must not look differentiable, since a second derivative
      // through them would miss the terms through the saved intermediates.  They get one Error
      // node whose next edges are dy's and the saved inputs' own: differentiating a gradient with
      // respect to anything it depends on (by backward() or autograd.grad) reaches that node and
      // raises, rather than silently skipping the missing terms.
      variable_list roots = {grad_outputs[0]};
      bool any_root = grad_outputs[0].requires_grad();
      for (int slot : {kX, kU, kS, kVh, kA, kB}) {
        if (saved[slot].defined()) {
          roots.push_back(saved[slot]);
          any_root = any_root || saved[slot].requires_grad();
        }
      }
      if (any_root) {
        auto err = c10::make_intrusive<torch::autograd::Error>(
            "cersa::linear: trying to differentiate twice; its backward is once_differentiable "
            "(double backward is not supported)",
            torch::autograd::collect_next_edges(roots));
        for (size_t i = 0; i < 7; ++i)
          if (needs[i] && out[i].defined()) torch::autograd::create_gradient_edge(out[i], err);
      }
    }
    return out;
  }
};

// Below autograd (inference tensors, or no autograd key): the forward kernel alone.
Tensor linear_no_grad(const Tensor& x, const Tensor& U, const Tensor& S, const Tensor& Vh,
                      const optional<Tensor>& A, const optional<Tensor>& B,
                      const optional<Tensor>& bias, double scale) {
  return std::get<0>(forward_op().call(x, U, S, Vh, A, B, bias, scale, false));
}

Tensor linear_autograd(const Tensor& x, const Tensor& U, const Tensor& S, const Tensor& Vh,
                       const optional<Tensor>& A, const optional<Tensor>& B,
                       const optional<Tensor>& bias, double scale) {
  auto grad = [](const optional<Tensor>& t) { return t.has_value() && t->requires_grad(); };
  auto tangent = [](const optional<Tensor>& t) {  // a forward-mode AD tangent (dual tensor)
    return t.has_value() && t->defined() && t->_fw_grad(/*level=*/0).defined();
  };
  const bool executable =
      torch::autograd::GradMode::is_enabled() &&
      (x.requires_grad() || U.requires_grad() || S.requires_grad() || Vh.requires_grad() ||
       grad(A) || grad(B) || grad(bias));
  const bool forward_ad = tangent(x) || tangent(U) || tangent(S) || tangent(Vh) || tangent(A) ||
                          tangent(B) || tangent(bias) ||
                          at::functorch::functorchTLSAccessor() != nullptr;
  if (!executable && !forward_ad) {
    // Nothing to differentiate (no_grad, or frozen everything): no graph node, nothing saved.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return linear_no_grad(x, U, S, Vh, A, B, bias, scale);
  }
  // (With a tangent or a functorch transform, apply raises: the C++ Function has no jvp.)
  return LinearFunction::apply(x, U, S, Vh, A, B, bias, scale, executable);
}

}  // namespace

TORCH_LIBRARY_IMPL(cersa, Autograd, m) { m.impl("linear", &linear_autograd); }

TORCH_LIBRARY_IMPL(cersa, CompositeExplicitAutograd, m) { m.impl("linear", &linear_no_grad); }

}  // namespace cersa
