# Reads python/flexselect/defaults.json (the single source of defaults for every path) and writes
# <build>/generated/flexselect/defaults_gen.h. Nothing is copied by hand: change the JSON, re-run the build.
set(_defaults_json "${CMAKE_SOURCE_DIR}/python/flexselect/defaults.json")
set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${_defaults_json}")
file(READ "${_defaults_json}" _json)

string(JSON FS_SET_FRAMES GET "${_json}" set_frames)
string(JSON FS_AGGREGATE GET "${_json}" aggregate)
foreach(_key num_layers reference_layer budget fps max_frames max_side prompt_prefix prompt_suffix)
  string(JSON _v ERROR_VARIABLE _err GET "${_json}" families qwen2_5_vl ${_key})
  if(_err)
    message(FATAL_ERROR "defaults.json: families.qwen2_5_vl.${_key} is missing (${_err})")
  endif()
  string(TOUPPER "${_key}" _k)
  set(FS_QWEN_${_k} "${_v}")
endforeach()
foreach(_s FS_QWEN_PROMPT_PREFIX FS_QWEN_PROMPT_SUFFIX FS_AGGREGATE)
  if("${${_s}}" MATCHES "\\)fsjson\"")
    message(FATAL_ERROR "defaults.json: ${_s} contains the raw-string delimiter )fsjson\"")
  endif()
endforeach()
configure_file("${CMAKE_SOURCE_DIR}/cpp/cmake/defaults_gen.h.in"
               "${CMAKE_BINARY_DIR}/generated/flexselect/defaults_gen.h" @ONLY)
