# Reads python/flexselect/defaults.json (the single source of defaults and family rules for every path) and writes
# <build>/generated/flexselect/defaults_gen.h. Nothing is copied by hand: change the JSON, re-run the build.
set(_defaults_json "${CMAKE_SOURCE_DIR}/python/flexselect/defaults.json")
set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${_defaults_json}")
file(READ "${_defaults_json}" _json)

string(JSON FS_SET_FRAMES GET "${_json}" set_frames)
string(JSON FS_AGGREGATE GET "${_json}" aggregate)
if("${FS_AGGREGATE}" MATCHES "\\)fsjson\"")
  message(FATAL_ERROR "defaults.json: aggregate contains the raw-string delimiter )fsjson\"")
endif()

# One table row per family the C++ runtime runs (the M-RoPE GGUF families), in the field order of defaults::Family.
set(FS_FAMILIES "")
foreach(_family qwen2_5_vl qwen2_vl qwen3_vl qwen3_vl_moe qwen3_5 qwen3_5_moe)
  set(_row "    {\"${_family}\"")
  foreach(_key num_layers reference_layer reference_layer_measured budget fps max_frames max_side tokens_per_second
               prompt_prefix prompt_suffix)
    string(JSON _v ERROR_VARIABLE _err GET "${_json}" families ${_family} ${_key})
    if(_key STREQUAL "reference_layer_measured")
      # absent: the paper measured it
      if(_err OR _v STREQUAL "ON" OR _v STREQUAL "true")
        set(_v true)
      else()
        set(_v false)
      endif()
    elseif(_key STREQUAL "tokens_per_second")
      # null or absent: no time scaling (the temporal position steps by 1 per unit), written as 0
      if(_err OR _v STREQUAL "null" OR _v STREQUAL "")
        set(_v 0)
      endif()
    elseif(_err)
      message(FATAL_ERROR "defaults.json: families.${_family}.${_key} is missing (${_err})")
    elseif(_key MATCHES "^prompt_")
      if("${_v}" MATCHES "\\)fsjson\"")
        message(FATAL_ERROR "defaults.json: families.${_family}.${_key} contains the raw-string delimiter )fsjson\"")
      endif()
      set(_v "R\"fsjson(${_v})fsjson\"")
    endif()
    string(APPEND _row ", ${_v}")
  endforeach()
  string(APPEND FS_FAMILIES "${_row}},\n")
endforeach()
configure_file("${CMAKE_SOURCE_DIR}/cpp/cmake/defaults_gen.h.in"
               "${CMAKE_BINARY_DIR}/generated/flexselect/defaults_gen.h" @ONLY)
