# ONNX Runtime for the Lite ranker: target `flexselect_onnxruntime` (C API headers + the shared library).
#
# Default: the shared library the `onnxruntime` wheel ships (found through the build's Python) and the official C API
# headers from the npm registry package com.github.asus4.onnxruntime (the wheel has no headers), fetched with
# `npm pack` and cached in the build tree. -DONNXRUNTIME_ROOT=<release folder> uses an ONNX Runtime release instead.
# The C API is versioned: we ask for ORT_API_VERSION of these headers, which any newer runtime still serves.

set(FLEXSELECT_ORT_NPM_PACKAGE "com.github.asus4.onnxruntime@0.4.9" CACHE STRING "npm package carrying ORT headers")
set(_ort_hint "pass -DONNXRUNTIME_ROOT=/path/to/onnxruntime-release, or -DFLEXSELECT_WITH_ONNXRUNTIME=OFF")

if(ONNXRUNTIME_ROOT)
  find_path(ORT_INCLUDE_DIR onnxruntime_c_api.h
            PATHS "${ONNXRUNTIME_ROOT}/include" "${ONNXRUNTIME_ROOT}/include/onnxruntime"
                  "${ONNXRUNTIME_ROOT}/include/onnxruntime/core/session" NO_DEFAULT_PATH)
  find_library(ORT_LIBRARY onnxruntime PATHS "${ONNXRUNTIME_ROOT}/lib" "${ONNXRUNTIME_ROOT}/lib64" NO_DEFAULT_PATH)
  if(NOT ORT_INCLUDE_DIR OR NOT ORT_LIBRARY)
    message(FATAL_ERROR "no onnxruntime_c_api.h / libonnxruntime under ONNXRUNTIME_ROOT=${ONNXRUNTIME_ROOT}")
  endif()
  set(_ort_lib "${ORT_LIBRARY}")
else()
  # 1. the library from the wheel
  if(NOT Python3_Interpreter_FOUND)
    message(FATAL_ERROR "ONNX Runtime: no Python to find the onnxruntime wheel; ${_ort_hint}")
  endif()
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c "import importlib.util as u, os; s = u.find_spec('onnxruntime'); print(os.path.dirname(s.origin) if s else '')"
    OUTPUT_VARIABLE _ort_pkg OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  file(GLOB _ort_libs "${_ort_pkg}/capi/libonnxruntime.so.1*" "${_ort_pkg}/capi/libonnxruntime.*.dylib")
  if(NOT _ort_pkg OR NOT _ort_libs)
    message(FATAL_ERROR "ONNX Runtime: the Python at ${Python3_EXECUTABLE} has no onnxruntime wheel "
                        "(pip install onnxruntime), or ${_ort_hint}")
  endif()
  list(GET _ort_libs 0 _ort_wheel_lib)
  # The wheel ships only libonnxruntime.so.1.x.y while its SONAME is libonnxruntime.so.1: copy it into the build tree
  # under its SONAME so the binaries find it there (RPATH) and keep working if the venv changes.
  get_filename_component(_ort_name "${_ort_wheel_lib}" NAME)
  string(REGEX REPLACE "^(libonnxruntime\\.so\\.1).*" "\\1" _ort_soname "${_ort_name}")
  configure_file("${_ort_wheel_lib}" "${CMAKE_BINARY_DIR}/lib/${_ort_soname}" COPYONLY)
  set(_ort_lib "${CMAKE_BINARY_DIR}/lib/${_ort_soname}")

  # 2. the headers from npm (cached: the package is ~150 MB)
  set(_ort_hdr_dir "${FLEXSELECT_DEPS_DIR}/onnxruntime-headers")
  if(NOT EXISTS "${_ort_hdr_dir}/onnxruntime_c_api.h")
    find_program(NPM_EXECUTABLE npm)
    if(NOT NPM_EXECUTABLE)
      message(FATAL_ERROR "ONNX Runtime: npm is needed once to fetch the C API headers; ${_ort_hint}")
    endif()
    set(_npm_dir "${FLEXSELECT_DEPS_DIR}/onnxruntime-npm")
    file(MAKE_DIRECTORY "${_npm_dir}")
    message(STATUS "flexselect: fetching ONNX Runtime C API headers (npm pack ${FLEXSELECT_ORT_NPM_PACKAGE}, ~150 MB)")
    execute_process(COMMAND "${NPM_EXECUTABLE}" pack --silent "${FLEXSELECT_ORT_NPM_PACKAGE}"
                    WORKING_DIRECTORY "${_npm_dir}" RESULT_VARIABLE _rc OUTPUT_QUIET)
    file(GLOB _tgz "${_npm_dir}/*.tgz")
    if(NOT _rc EQUAL 0 OR NOT _tgz)
      message(FATAL_ERROR "ONNX Runtime: `npm pack ${FLEXSELECT_ORT_NPM_PACKAGE}` failed; ${_ort_hint}")
    endif()
    list(GET _tgz 0 _tgz)
    file(ARCHIVE_EXTRACT INPUT "${_tgz}" DESTINATION "${_npm_dir}/x" PATTERNS "*ios-arm64_x86_64-simulator*Headers/*")
    file(GLOB_RECURSE _capi "${_npm_dir}/x/*/onnxruntime_c_api.h")
    if(NOT _capi)
      message(FATAL_ERROR "ONNX Runtime: no onnxruntime_c_api.h in ${_tgz}; ${_ort_hint}")
    endif()
    list(GET _capi 0 _capi)
    get_filename_component(_hdrs "${_capi}" DIRECTORY)
    file(GLOB _hfiles "${_hdrs}/*.h")
    file(MAKE_DIRECTORY "${_ort_hdr_dir}")
    file(COPY ${_hfiles} DESTINATION "${_ort_hdr_dir}")
    file(REMOVE_RECURSE "${_npm_dir}/x" "${_tgz}")  # the headers are all we keep
  endif()
  set(ORT_INCLUDE_DIR "${_ort_hdr_dir}")
endif()

add_library(flexselect_onnxruntime SHARED IMPORTED GLOBAL)
set_target_properties(flexselect_onnxruntime PROPERTIES
  IMPORTED_LOCATION "${_ort_lib}"
  INTERFACE_INCLUDE_DIRECTORIES "${ORT_INCLUDE_DIR}")
get_filename_component(FLEXSELECT_ORT_LIB_DIR "${_ort_lib}" DIRECTORY)
message(STATUS "flexselect: ONNX Runtime ${_ort_lib} (headers ${ORT_INCLUDE_DIR})")
