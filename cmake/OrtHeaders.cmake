# topt_find_ort_headers(<out_var>): a directory holding onnxruntime_cxx_api.h, found in order:
#   1. TOPT_ORT_INCLUDE_DIR, as a CMake variable (-DTOPT_ORT_INCLUDE_DIR=...) or environment variable;
#   2. the cached copy <source>/.cache/ort-include (git-ignored);
#   3. tools/fetch_ort_headers.sh, which fills that cache from Debian trixie's libonnxruntime-dev.
# The library is built against ORT_API_VERSION 21 headers so it loads in any newer runtime.
function(topt_find_ort_headers out_var)
  set(hint "set TOPT_ORT_INCLUDE_DIR to your ONNX Runtime release's include/ (the directory with onnxruntime_cxx_api.h)")
  set(user_dir "${TOPT_ORT_INCLUDE_DIR}")
  if(NOT user_dir AND DEFINED ENV{TOPT_ORT_INCLUDE_DIR})
    set(user_dir "$ENV{TOPT_ORT_INCLUDE_DIR}")
  endif()
  if(user_dir)
    if(NOT EXISTS "${user_dir}/onnxruntime_cxx_api.h")
      message(FATAL_ERROR "TOPT_ORT_INCLUDE_DIR=${user_dir} has no onnxruntime_cxx_api.h: ${hint}")
    endif()
    set(${out_var} "${user_dir}" PARENT_SCOPE)
    message(STATUS "topt: ONNX Runtime headers from TOPT_ORT_INCLUDE_DIR: ${user_dir}")
    return()
  endif()

  set(cache_dir "${PROJECT_SOURCE_DIR}/.cache/ort-include")
  if(NOT EXISTS "${cache_dir}/onnxruntime_cxx_api.h")
    message(STATUS "topt: fetching ONNX Runtime headers into ${cache_dir} (tools/fetch_ort_headers.sh)")
    execute_process(
      COMMAND bash "${PROJECT_SOURCE_DIR}/tools/fetch_ort_headers.sh" "${cache_dir}"
      RESULT_VARIABLE rc)
    if(NOT rc EQUAL 0 OR NOT EXISTS "${cache_dir}/onnxruntime_cxx_api.h")
      message(FATAL_ERROR "ONNX Runtime C/C++ headers not found and tools/fetch_ort_headers.sh failed: ${hint}")
    endif()
  endif()
  set(${out_var} "${cache_dir}" PARENT_SCOPE)
  message(STATUS "topt: ONNX Runtime headers from ${cache_dir}")
endfunction()
