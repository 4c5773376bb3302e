// A C++-only process loads libfopru.so, finds the ops through the dispatcher (no Python) and checks
// a hand-worked case of tests/test_significance.py plus one error message.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>

#include <cstdio>
#include <string>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s path/to/libfopru.so\n", argv[0]);
    return 2;
  }
  if (!dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL)) {
    std::fprintf(stderr, "dlopen failed: %s\n", dlerror());
    return 1;
  }
  auto prune = c10::Dispatcher::singleton()
                   .findSchemaOrThrow("fopru::prune_tokens", "")
                   .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t,
                                                            c10::string_view, c10::string_view, int64_t,
                                                            at::OptionalIntArrayRef)>();
  auto significance = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("fopru::significance", "")
                          .typed<at::Tensor(const at::Tensor&, c10::string_view, int64_t)>();

  // CLS rows of two heads; patch significance [.375, .625, .5, .625] in units of 2^28.
  std::vector<float> cls = {0.5f, 0.125f, 0.5f, 0.25f, 0.125f, 0.5f, 0.25f, 0.125f, 0.25f, 0.5f};
  at::Tensor attn = at::from_blob(cls.data(), {1, 2, 1, 5}, at::kFloat).clone();
  at::Tensor tokens = at::arange(12, at::kFloat).reshape({1, 4, 3});

  at::Tensor sig = significance.call(attn, "cls", 1);
  const int64_t u = int64_t{1} << 25;  // 2^28 / 8
  expect(sig.equal(at::tensor({3 * u, 5 * u, 4 * u, 5 * u}, at::kLong).reshape({1, 4})), "significance cls");

  auto [pruned, idx] = prune.call(tokens, attn, 2, "rank", "cls", 1, std::nullopt);
  expect(idx.equal(at::tensor({1, 3}, at::kLong).reshape({1, 2})), "rank keeps tokens 1 and 3");
  expect(pruned.equal(tokens.index_select(1, idx[0])), "gathered rows");

  std::vector<int64_t> grid = {2, 2};
  auto [pruned_row, idx_row] = prune.call(tokens, attn, 2, "row", "cls", 1, grid);
  expect(idx_row.equal(at::tensor({2, 3}, at::kLong).reshape({1, 2})), "row keeps grid row 1");

  try {
    prune.call(tokens, attn, 3, "row", "cls", 1, grid);
    expect(false, "keep not a multiple of cols raises");
  } catch (const c10::ValueError& e) {
    expect(std::string(e.what()).find("nearest valid values are 2 and 4") != std::string::npos,
           "keep not a multiple of cols raises ValueError naming 2 and 4");
  }
  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
