// Plinth's shim over libtorch's AOTInductor package loader.
//
// The only C++ Plinth compiles. Every entry point catches every exception and
// turns it into an error string the Rust side owns and frees; nothing unwinds
// across the C boundary. Tensors cross as `at::Tensor*`, the representation
// tch uses, so the Rust side wraps them without copying.

#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include <ATen/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

namespace {

char* copy_string(const std::string& text) {
  char* out = static_cast<char*>(std::malloc(text.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, text.c_str(), text.size() + 1);
  }
  return out;
}

// Runs `body`, returning true; on any exception stores its message in
// `*error` (when `error` is not null) and returns false.
template <typename F>
bool guarded(char** error, F&& body) {
  try {
    body();
    return true;
  } catch (const c10::Error& err) {
    if (error != nullptr) *error = copy_string(err.what_without_backtrace());
  } catch (const std::exception& err) {
    if (error != nullptr) *error = copy_string(err.what());
  } catch (...) {
    if (error != nullptr) *error = copy_string("unknown C++ exception");
  }
  return false;
}

}  // namespace

struct PlinthAoti {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
};

extern "C" {

// Loads the package at `path` with `num_runners` models able to run at once,
// on CUDA device `device_index` (-1 for the CPU). Null on failure, with
// `*error` set.
PlinthAoti* plinth_aoti_load(const char* path, const char* model_name,
                             size_t num_runners, int device_index,
                             char** error) {
  PlinthAoti* out = nullptr;
  guarded(error, [&] {
    auto loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
        path, model_name, /*run_single_threaded=*/false, num_runners,
        static_cast<c10::DeviceIndex>(device_index));
    out = new PlinthAoti{std::move(loader)};
  });
  return out;
}

void plinth_aoti_free(PlinthAoti* package) {
  guarded(nullptr, [&] { delete package; });
}

// Runs the package on `n_inputs` borrowed tensors. On success `*outputs` is a
// malloc'd array of `*n_outputs` new tensors, each owned by the caller (free
// the array with plinth_aoti_free_array). Returns false with `*error` set on
// failure.
bool plinth_aoti_run(PlinthAoti* package, at::Tensor* const* inputs,
                     size_t n_inputs, at::Tensor*** outputs,
                     size_t* n_outputs, char** error) {
  *outputs = nullptr;
  *n_outputs = 0;
  return guarded(error, [&] {
    std::vector<at::Tensor> args;
    args.reserve(n_inputs);
    for (size_t i = 0; i < n_inputs; ++i) {
      args.push_back(*inputs[i]);
    }
    std::vector<at::Tensor> results = package->loader->run(args);
    auto** array = static_cast<at::Tensor**>(
        std::malloc(sizeof(at::Tensor*) * (results.empty() ? 1 : results.size())));
    if (array == nullptr) {
      throw std::bad_alloc();
    }
    for (size_t i = 0; i < results.size(); ++i) {
      array[i] = new at::Tensor(std::move(results[i]));
    }
    *outputs = array;
    *n_outputs = results.size();
  });
}

void plinth_aoti_free_array(void* array) { std::free(array); }

void plinth_aoti_free_string(char* text) { std::free(text); }

}  // extern "C"
