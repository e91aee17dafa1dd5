// Video decoding with FFmpeg's libraries: sample frames while decoding (only the sampled ones are kept, converted to
// RGB and resized on the fly), so an hour-long video never sits in memory at full size.
#include "flexselect/flexselect.h"

extern "C" {
#include <libavcodec/avcodec.h>
#include <libavformat/avformat.h>
#include <libavutil/imgutils.h>
#include <libswscale/swscale.h>
}

#include <algorithm>
#include <cmath>
#include <cstring>

namespace flexselect {

std::vector<int64_t> uniform_indices(int64_t n_frames, int n) {
    std::vector<int64_t> out;
    if (n_frames <= 0 || n <= 0) return out;
    n = (int) std::min<int64_t>(n, n_frames);  // never the same frame twice
    for (int i = 0; i < n; ++i) {
        // centre of segment i of n equal segments, in exact integer arithmetic: floor((2i + 1) * N / (2n))
        out.push_back(((2 * (int64_t) i + 1) * n_frames) / (2 * (int64_t) n));
    }
    return out;
}

std::vector<int64_t> fps_indices(int64_t n_frames, double source_fps, double fps, int max_frames) {
    if (!(fps > 0.0) || !(source_fps > 0.0)) throw Error("the sampling fps must be positive");
    // as many frames as the span lasts at `fps`, taken at segment centres (so the same rule as uniform sampling)
    int64_t n = std::max<int64_t>(1, std::llround((double) n_frames * fps / source_fps));
    if (max_frames > 0) n = std::min<int64_t>(n, max_frames);
    return uniform_indices(n_frames, (int) std::min<int64_t>(n, 1 << 30));
}

void target_size(int width, int height, int max_side, int & out_width, int & out_height, int factor) {
    double w = width, h = height;
    if (max_side > 0 && std::max(w, h) > max_side) {
        const double scale = (double) max_side / std::max(w, h);
        w *= scale;
        h *= scale;
    }
    // nearest multiple of the factor (ties to even, as Python's round()), at least one
    auto snap = [factor](double v) { return std::max(factor, (int) std::nearbyint(v / factor) * factor); };
    out_width = snap(w);
    out_height = snap(h);
}

namespace {

// RAII for the FFmpeg handles.
struct FormatCtx {
    AVFormatContext * p = nullptr;
    ~FormatCtx() { avformat_close_input(&p); }
};
struct CodecCtx {
    AVCodecContext * p = nullptr;
    ~CodecCtx() { avcodec_free_context(&p); }
};
struct Frame {
    AVFrame * p = av_frame_alloc();
    ~Frame() { av_frame_free(&p); }
};
struct Packet {
    AVPacket * p = av_packet_alloc();
    ~Packet() { av_packet_free(&p); }
};
struct Sws {
    SwsContext * p = nullptr;
    ~Sws() { sws_freeContext(p); }
};

struct Image {  // av_image_alloc'd planes
    uint8_t * data[4] = {nullptr, nullptr, nullptr, nullptr};
    int linesize[4] = {0, 0, 0, 0};
    ~Image() { av_freep(&data[0]); }
};

std::string av_error(int err) {
    char buf[AV_ERROR_MAX_STRING_SIZE] = {0};
    av_strerror(err, buf, sizeof(buf));
    return buf;
}

}  // namespace

Clip load_clip(const std::string & path, const SamplingOptions & opts) {
    av_log_set_level(AV_LOG_ERROR);
    FormatCtx fmt;
    int err = avformat_open_input(&fmt.p, path.c_str(), nullptr, nullptr);
    if (err < 0) throw Error("cannot open video " + path + ": " + av_error(err));
    if ((err = avformat_find_stream_info(fmt.p, nullptr)) < 0) {
        throw Error("cannot read video " + path + ": " + av_error(err));
    }
    const AVCodec * codec = nullptr;
    const int si = av_find_best_stream(fmt.p, AVMEDIA_TYPE_VIDEO, -1, -1, &codec, 0);
    if (si < 0 || !codec) throw Error("no decodable video stream in " + path);
    AVStream * st = fmt.p->streams[si];

    CodecCtx dec;
    dec.p = avcodec_alloc_context3(codec);
    if (!dec.p || avcodec_parameters_to_context(dec.p, st->codecpar) < 0 || avcodec_open2(dec.p, codec, nullptr) < 0) {
        throw Error("cannot open the video decoder for " + path);
    }
    if (dec.p->width <= 0 || dec.p->height <= 0) throw Error("video " + path + " has no frame size");

    AVRational rate = st->avg_frame_rate.num > 0 ? st->avg_frame_rate : st->r_frame_rate;
    const double source_fps = rate.num > 0 && rate.den > 0 ? av_q2d(rate) : 0.0;
    if (!(source_fps > 0.0)) throw Error("video " + path + " has no frame rate");

    // Frame count: the container's, else count the packets in a quick demux-only pass (no decoding).
    int64_t n_total = st->nb_frames;
    if (n_total <= 0) {
        Packet pkt;
        n_total = 0;
        while (av_read_frame(fmt.p, pkt.p) >= 0) {
            if (pkt.p->stream_index == si) ++n_total;
            av_packet_unref(pkt.p);
        }
        if (av_seek_frame(fmt.p, si, st->start_time == AV_NOPTS_VALUE ? 0 : st->start_time, AVSEEK_FLAG_BACKWARD) < 0) {
            throw Error("cannot rewind video " + path);
        }
        avcodec_flush_buffers(dec.p);
    }
    if (n_total <= 0) throw Error("video " + path + " has no frames");

    // Trim to [start, end) in frame indices, then pick the sampled indices within it.
    int64_t first = 0, last = n_total;
    if (opts.start > 0) first = std::min<int64_t>(n_total, (int64_t) std::ceil(opts.start * source_fps - 1e-9));
    if (opts.end > 0) last = std::min<int64_t>(n_total, (int64_t) std::ceil(opts.end * source_fps - 1e-9));
    if (last <= first) throw Error("no frames between start and end in " + path);
    const int64_t count = last - first;
    const double fps = opts.fps > 0 ? opts.fps : 2.0;
    std::vector<int64_t> wanted =
        opts.frames > 0 ? uniform_indices(count, opts.frames) : fps_indices(count, source_fps, fps, opts.max_frames);
    // frames the fps request asks for: when all of them are taken (no cap), the clip reports the requested rate
    const int64_t at_fps = opts.frames > 0 ? -1 : std::max<int64_t>(1, std::llround((double) count * fps / source_fps));
    for (auto & w : wanted) w += first;

    Clip clip;
    clip.source_frames = count;
    clip.source_fps = source_fps;
    target_size(dec.p->width, dec.p->height, opts.max_side, clip.width, clip.height, opts.pixel_factor);

    Frame frame;
    Packet pkt;
    Sws sws;
    Image rgb_pad;
    if (av_image_alloc(rgb_pad.data, rgb_pad.linesize, clip.width, clip.height + 1, AV_PIX_FMT_RGB24, 64) < 0) {
        throw Error("out of memory for a video frame");
    }
    int sws_w = 0, sws_h = 0, sws_fmt = -1;
    int64_t index = 0;  // output frames come in presentation order: count them
    size_t next = 0;

    auto take = [&](AVFrame * f) {
        if (next < wanted.size() && index == wanted[next]) {
            if (!sws.p || f->width != sws_w || f->height != sws_h || f->format != sws_fmt) {
                sws_freeContext(sws.p);
                // A frame whose size is already right is only converted to RGB, never resampled (tests rely on
                // identical pixels in Python and C++). Bilinear is also PyAV's default.
                sws.p = sws_getContext(f->width, f->height, (AVPixelFormat) f->format, clip.width, clip.height,
                                       AV_PIX_FMT_RGB24, SWS_BILINEAR, nullptr, nullptr, nullptr);
                if (!sws.p) throw Error("cannot convert the frames of " + path + " to RGB");
                sws_w = f->width, sws_h = f->height, sws_fmt = f->format;
            }
            // swscale's SIMD code writes whole vectors past the end of a row: convert into FFmpeg's own padded,
            // aligned image and copy the rows out (a tight buffer would be overrun; valgrind shows it).
            if (sws_scale(sws.p, f->data, f->linesize, 0, f->height, rgb_pad.data, rgb_pad.linesize) != clip.height) {
                throw Error("cannot convert a frame of " + path + " to RGB");
            }
            const size_t row = (size_t) clip.width * 3;
            std::vector<uint8_t> rgb(row * clip.height);
            for (int y = 0; y < clip.height; ++y)
                std::memcpy(&rgb[y * row], rgb_pad.data[0] + (size_t) y * rgb_pad.linesize[0], row);
            clip.frames.push_back(std::move(rgb));
            clip.timestamps.push_back((double) index / source_fps);
            ++next;
        }
        ++index;
    };
    auto drain = [&]() {
        int r;
        while ((r = avcodec_receive_frame(dec.p, frame.p)) >= 0) {
            take(frame.p);
            av_frame_unref(frame.p);
        }
        if (r != AVERROR(EAGAIN) && r != AVERROR_EOF) throw Error("error decoding " + path + ": " + av_error(r));
    };
    while (next < wanted.size() && av_read_frame(fmt.p, pkt.p) >= 0) {
        if (pkt.p->stream_index == si) {
            err = avcodec_send_packet(dec.p, pkt.p);
            av_packet_unref(pkt.p);
            if (err < 0 && err != AVERROR(EAGAIN)) throw Error("error decoding " + path + ": " + av_error(err));
            drain();
        } else {
            av_packet_unref(pkt.p);
        }
    }
    if (next < wanted.size()) {  // flush the decoder's delayed frames
        avcodec_send_packet(dec.p, nullptr);
        drain();
    }
    if (clip.frames.empty()) throw Error("no frames could be decoded from " + path);
    // What the M-RoPE temporal step is computed from, as python/flexselect/video.py: the requested rate when it was
    // met, else the sampled frames per second of the sampled span.
    const double n = (double) clip.frames.size();
    clip.sample_fps = (int64_t) clip.frames.size() == at_fps ? fps : n / ((double) count / source_fps);
    return clip;
}

}  // namespace flexselect
