// The rule of the α-CL loss as the kernels see it (the Python side, fastalpha/rules.py, has
// already validated and canonicalised it: entropy is direct with p = 2, ε = 0 where unused).
#pragma once

#include <string>

#include <c10/util/Exception.h>

namespace fastalpha {

enum class Rule { Quadratic, Entropy, Direct, Inverse, Square, InfoNCE };

inline Rule parse_rule(const std::string& name) {
  if (name == "quadratic") return Rule::Quadratic;
  if (name == "entropy") return Rule::Entropy;
  if (name == "direct") return Rule::Direct;
  if (name == "inverse") return Rule::Inverse;
  if (name == "square") return Rule::Square;
  if (name == "infonce") return Rule::InfoNCE;
  TORCH_CHECK(false, "fastalpha: unknown rule '", name,
              "'; expected quadratic, entropy, direct, inverse, square or infonce");
}

struct RuleConfig {
  Rule rule;
  double temperature;  // τ
  double p;            // entropy/direct: w = exp(−d2^{p/2}/τ)
  double gamma;        // inverse: w = (d2 + τ)^{−1/γ}
  double eps;          // entropy/direct/infonce normaliser ε
  bool detach_alpha;   // false: the pair term uses β (DESIGN.md §1) instead of α

  // α = w(d2) / (Σ w + c): the rules whose gradient through α is the β_ij = α_ij(1 − t'(v − c)) term.
  bool is_log_weight() const { return rule == Rule::Entropy || rule == Rule::Direct || rule == Rule::Inverse; }
  // For quadratic (constant α) and infonce (Theorem 1 is exact) β = α, so detaching changes nothing.
  bool uses_beta() const { return !detach_alpha && (is_log_weight() || rule == Rule::Square); }
  // Gradient scale: infonce's loss log(ε + ξ) has gradient −∇E/τ (Theorem 1).
  double gradient_scale() const { return rule == Rule::InfoNCE ? 1.0 / temperature : 1.0; }
};

inline RuleConfig make_rule(const std::string& name, double temperature, double p, double gamma, double eps,
                            bool detach_alpha) {
  RuleConfig cfg{parse_rule(name), temperature, p, gamma, eps, detach_alpha};
  TORCH_CHECK(temperature > 0, "fastalpha: temperature must be > 0, got ", temperature);
  TORCH_CHECK(p > 0, "fastalpha: p must be > 0, got ", p);
  TORCH_CHECK(gamma > 0, "fastalpha: gamma must be > 0, got ", gamma);
  TORCH_CHECK(eps >= 0, "fastalpha: eps must be >= 0, got ", eps);
  return cfg;
}

}  // namespace fastalpha
