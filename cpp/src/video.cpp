// Video decoding with FFmpeg's libraries: sample frames while decoding (only the sampled ones are kept, converted to
// RGB and resized on the fly), so an hour-long video never sits in memory at full size.
#include "flexselect/flexselect.h"

extern "C" {
#include <libavcodec/avcodec.h>
#include <libavformat/avformat.h>
#include <libavutil/display.h>
#include <libavutil/imgutils.h>
#include <libswscale/swscale.h>
}

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

namespace flexselect {

// Slack when comparing sampling times with frame times (python/flexselect/video.py's TIME_EPS).
static constexpr double kTimeEps = 1e-9;

FramePlan sample_frames(const std::vector<double> & times, double end_s, const SamplingOptions & opts) {
    const int64_t n_frames = (int64_t) times.size();
    if (n_frames == 0 || !(end_s > 0.0)) throw Error("the video has no frames");
    const double t0 = opts.start > 0 ? opts.start : 0.0;
    const double t1 = opts.end > 0 ? std::min(opts.end, end_s) : end_s;
    char buf[160];
    if (t0 >= end_s) {
        std::snprintf(buf, sizeof buf, "--start %.2fs is beyond the end of the video (%.2fs)", t0, end_s);
        throw Error(buf);
    }
    if (t1 <= t0) {
        std::snprintf(buf, sizeof buf, "--end (%.2fs) must be after --start (%.2fs)", t1, t0);
        throw Error(buf);
    }
    // the span: from the frame shown at t0 to the end of the last frame shown before t1
    auto shown_at = [&](double t) {  // the last frame whose time is <= t
        return (int64_t) (std::upper_bound(times.begin(), times.end(), t + kTimeEps) - times.begin()) - 1;
    };
    const int64_t first = std::max<int64_t>(0, shown_at(t0));
    const int64_t stop =
        std::max<int64_t>(first + 1, std::lower_bound(times.begin(), times.end(), t1 - kTimeEps) - times.begin());
    const double lo = times[first], hi = stop < n_frames ? times[stop] : end_s;
    int64_t n = opts.frames > 0 ? opts.frames
                : opts.fps > 0  ? std::max<int64_t>(1, (int64_t) std::nearbyint((t1 - t0) * opts.fps))
                                : stop - first;
    const int64_t requested = n;
    n = std::min<int64_t>(n, stop - first);
    if (opts.max_frames > 0) n = std::min<int64_t>(n, opts.max_frames);
    FramePlan plan;
    plan.fps_met = opts.frames <= 0 && opts.fps > 0 && n == requested;
    // the frames shown at the centres of n equal segments of the span (a long-shown frame is taken once)
    for (int64_t i = 0; i < n; ++i) {
        const double at = lo + (double) (2 * i + 1) * (hi - lo) / (double) (2 * n);
        const int64_t k = std::clamp<int64_t>(shown_at(at), first, stop - 1);
        if (plan.indices.empty() || plan.indices.back() != k) plan.indices.push_back(k);
    }
    plan.span_s = hi - lo;
    return plan;
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

// An opened input and its video stream.
struct Input {
    FormatCtx fmt;
    int si = -1;
    const AVCodec * codec = nullptr;
    AVStream * st() const { return fmt.p->streams[si]; }
};

void open_input(Input & in, const std::string & path) {
    int err = avformat_open_input(&in.fmt.p, path.c_str(), nullptr, nullptr);
    if (err < 0) throw Error("cannot open video " + path + ": " + av_error(err));
    if ((err = avformat_find_stream_info(in.fmt.p, nullptr)) < 0) {
        throw Error("cannot read video " + path + ": " + av_error(err));
    }
    in.si = av_find_best_stream(in.fmt.p, AVMEDIA_TYPE_VIDEO, -1, -1, &in.codec, 0);
    if (in.si >= 0 && in.st()->codecpar->codec_id == AV_CODEC_ID_WEBP) {
        throw Error(path + " is a WebP image: animated WebP is not supported (FFmpeg decodes only still WebP "
                           "images); convert it to a video file (MP4, WebM or GIF) first");
    }
    if (in.si < 0 || !in.codec) throw Error("no decodable video stream in " + path);
}

// The display matrix's rotation in quarter turns, counter-clockwise degrees (0, 90, 180, 270).
int display_rotation(const AVStream * st) {
    const uint8_t * matrix = nullptr;
#if LIBAVCODEC_VERSION_INT >= AV_VERSION_INT(60, 30, 100)
    const AVPacketSideData * sd = av_packet_side_data_get(st->codecpar->coded_side_data,
                                                          st->codecpar->nb_coded_side_data, AV_PKT_DATA_DISPLAYMATRIX);
    if (sd && sd->size >= 9 * sizeof(int32_t)) matrix = sd->data;
#else
    size_t size = 0;
    matrix = av_stream_get_side_data(st, AV_PKT_DATA_DISPLAYMATRIX, &size);
    if (size < 9 * sizeof(int32_t)) matrix = nullptr;
#endif
    if (!matrix) return 0;
    const double deg = av_display_rotation_get((const int32_t *) matrix);
    if (!std::isfinite(deg)) return 0;
    return (int) (((std::lround(deg / 90.0) % 4) + 4) % 4) * 90;
}

// rgb (w x h) turned counter-clockwise by `rotation` degrees, as numpy's rot90.
std::vector<uint8_t> rotate_rgb(const std::vector<uint8_t> & rgb, int w, int h, int rotation) {
    if (rotation == 0) return rgb;
    const int ow = rotation == 180 ? w : h, oh = rotation == 180 ? h : w;
    std::vector<uint8_t> out(rgb.size());
    for (int i = 0; i < oh; ++i) {
        for (int j = 0; j < ow; ++j) {
            const int y = rotation == 90 ? j : rotation == 180 ? h - 1 - i : h - 1 - j;
            const int x = rotation == 90 ? w - 1 - i : rotation == 180 ? w - 1 - j : i;
            std::memcpy(&out[((size_t) i * ow + j) * 3], &rgb[((size_t) y * w + x) * 3], 3);
        }
    }
    return out;
}

}  // namespace

Clip load_clip(const std::string & path, const SamplingOptions & opts) {
    av_log_set_level(AV_LOG_ERROR);
    Clip clip;
    // 1. The timeline: every packet's presentation timestamp, from a demux-only pass (no decoding), so frames are
    //    picked by the time a player shows them (variable frame rate included).
    std::vector<int64_t> pts;
    int64_t top = AV_NOPTS_VALUE, last_duration = 0, stream_end = AV_NOPTS_VALUE;
    bool timed = true;
    AVRational tb{0, 1};
    double rate = 0.0, untimed_rate = 0.0;
    int width = 0, height = 0, rotation = 0;
    {
        Input in;
        open_input(in, path);
        AVStream * st = in.st();
        tb = st->time_base;
        const AVRational guess = av_guess_frame_rate(in.fmt.p, st, nullptr);
        const double guessed = guess.num > 0 && guess.den > 0 ? av_q2d(guess) : 0.0;
        rate = st->avg_frame_rate.num > 0 && st->avg_frame_rate.den > 0 ? av_q2d(st->avg_frame_rate)
               : guessed > 0                                            ? guessed
                                                                        : 25.0;
        untimed_rate = guessed > 0 ? guessed : rate;  // the codec's own rate (an H.264 stream's timing info)
        width = st->codecpar->width, height = st->codecpar->height;
        rotation = display_rotation(st);
        // where the stream ends, as its header says (packet durations differ between FFmpeg versions)
        if (st->duration > 0 && st->start_time != AV_NOPTS_VALUE) stream_end = st->start_time + st->duration;
        Packet pkt;
        int err;
        while ((err = av_read_frame(in.fmt.p, pkt.p)) >= 0) {
            if (pkt.p->stream_index == in.si && pkt.p->size > 0) {
                pts.push_back(pkt.p->pts);
                if (pkt.p->pts == AV_NOPTS_VALUE) timed = false;
                else if (top == AV_NOPTS_VALUE || pkt.p->pts >= top) top = pkt.p->pts, last_duration = pkt.p->duration;
            }
            av_packet_unref(pkt.p);
        }
    }
    if (pts.empty() || width <= 0 || height <= 0) throw Error(path + " contains no decodable video frames");
    const int64_t n_frames = (int64_t) pts.size();
    std::sort(pts.begin(), pts.end());
    if (timed && std::adjacent_find(pts.begin(), pts.end()) != pts.end()) timed = false;  // repeated: no order
    std::vector<double> times(n_frames);
    double end_s;
    if (timed) {  // integer product, one division: python/flexselect/video.py gets the same doubles
        for (int64_t k = 0; k < n_frames; ++k) times[k] = (double) ((pts[k] - pts[0]) * tb.num) / tb.den;
        // the end of the last frame: the stream's end, else its packet's duration, else the mean spacing, else one
        // frame at the average rate (python/flexselect/video.py's probe)
        end_s = stream_end != AV_NOPTS_VALUE ? (double) ((stream_end - pts[0]) * tb.num) / tb.den : 0.0;
        if (!(end_s > times.back())) end_s = times.back() + (double) (last_duration * tb.num) / tb.den;
        if (!(end_s > times.back())) {
            end_s =
                times.back() + (n_frames > 1 && times.back() > 0 ? times.back() / (double) (n_frames - 1) : 1.0 / rate);
        }
    } else {  // no timestamps (a raw Annex-B .h264 stream): evenly spaced at the codec's rate
        for (int64_t k = 0; k < n_frames; ++k) times[k] = (double) k / untimed_rate;
        end_s = (double) n_frames / untimed_rate;
        rate = untimed_rate;
    }
    const FramePlan plan = sample_frames(times, end_s, opts);
    const std::vector<int64_t> & wanted = plan.indices;
    // frames are matched by timestamp (a packet that fails to decode shifts no later frame), or counted if untimed
    std::vector<int64_t> keys(wanted.size());
    for (size_t i = 0; i < wanted.size(); ++i) keys[i] = timed ? pts[wanted[i]] : wanted[i];

    clip.source_frames = n_frames;
    clip.source_fps = rate;
    const bool turned = rotation == 90 || rotation == 270;
    target_size(turned ? height : width, turned ? width : height, opts.max_side, clip.width, clip.height,
                opts.pixel_factor);
    const int dec_w = turned ? clip.height : clip.width, dec_h = turned ? clip.width : clip.height;

    // 2. Decode from the start again (a reopened file: MPEG-TS and raw streams do not rewind reliably).
    Input in;
    open_input(in, path);
    CodecCtx dec;
    dec.p = avcodec_alloc_context3(in.codec);
    if (!dec.p || avcodec_parameters_to_context(dec.p, in.st()->codecpar) < 0 ||
        avcodec_open2(dec.p, in.codec, nullptr) < 0) {
        throw Error("cannot open the video decoder for " + path);
    }

    Frame frame;
    Packet pkt;
    Sws sws;
    Image rgb_pad;
    if (av_image_alloc(rgb_pad.data, rgb_pad.linesize, dec_w, dec_h + 1, AV_PIX_FMT_RGB24, 64) < 0) {
        throw Error("out of memory for a video frame");
    }
    int sws_w = 0, sws_h = 0, sws_fmt = -1;
    int64_t counted = -1;  // frames come out in presentation order
    std::vector<std::vector<uint8_t>> got(wanted.size());
    bool done = false;
    int bad = 0;

    auto take = [&](AVFrame * f) {
        ++counted;
        const int64_t key = timed ? f->pts : counted;
        if (key == AV_NOPTS_VALUE) return;
        done = done || key >= keys.back();
        const auto it = std::lower_bound(keys.begin(), keys.end(), key);
        if (it == keys.end() || *it != key || !got[it - keys.begin()].empty()) return;
        if (!sws.p || f->width != sws_w || f->height != sws_h || f->format != sws_fmt) {
            sws_freeContext(sws.p);
            // A frame whose size is already right is only converted to RGB, never resampled (tests rely on
            // identical pixels in Python and C++). Bilinear is also PyAV's default.
            sws.p = sws_getContext(f->width, f->height, (AVPixelFormat) f->format, dec_w, dec_h, AV_PIX_FMT_RGB24,
                                   SWS_BILINEAR, nullptr, nullptr, nullptr);
            if (!sws.p) throw Error("cannot convert the frames of " + path + " to RGB");
            sws_w = f->width, sws_h = f->height, sws_fmt = f->format;
        }
        // swscale's SIMD code writes whole vectors past the end of a row: convert into FFmpeg's own padded,
        // aligned image and copy the rows out (a tight buffer would be overrun; valgrind shows it).
        if (sws_scale(sws.p, f->data, f->linesize, 0, f->height, rgb_pad.data, rgb_pad.linesize) != dec_h) {
            throw Error("cannot convert a frame of " + path + " to RGB");
        }
        const size_t row = (size_t) dec_w * 3;
        std::vector<uint8_t> rgb(row * dec_h);
        for (int y = 0; y < dec_h; ++y)
            std::memcpy(&rgb[y * row], rgb_pad.data[0] + (size_t) y * rgb_pad.linesize[0], row);
        got[it - keys.begin()] = rotate_rgb(rgb, dec_w, dec_h, rotation);
    };
    auto drain = [&]() {
        int r;
        while ((r = avcodec_receive_frame(dec.p, frame.p)) >= 0) {
            take(frame.p);
            av_frame_unref(frame.p);
        }
        if (r != AVERROR(EAGAIN) && r != AVERROR_EOF) ++bad;
    };
    int err = 0;
    while (!done && (err = av_read_frame(in.fmt.p, pkt.p)) >= 0) {
        check_stop();
        if (pkt.p->stream_index == in.si) {
            const int sent = avcodec_send_packet(dec.p, pkt.p);
            if (sent < 0 && sent != AVERROR(EAGAIN)) ++bad;  // a damaged packet: skipped, as the Python path does
            else drain();
        }
        av_packet_unref(pkt.p);
    }
    if (!done) {  // flush the decoder's delayed frames
        avcodec_send_packet(dec.p, nullptr);
        drain();
    }
    if (!done && err < 0 && err != AVERROR_EOF) {
        clip.warnings.push_back(path + " is damaged after frame " + std::to_string(counted) +
                                "; using the frames decoded before it");
    }
    if (bad > 0) {
        clip.warnings.push_back(path + ": " + std::to_string(bad) +
                                " damaged packet(s) could not be decoded and were skipped");
    }
    for (size_t i = 0; i < wanted.size(); ++i) {
        if (got[i].empty()) continue;
        clip.frames.push_back(std::move(got[i]));
        clip.timestamps.push_back(times[wanted[i]]);
    }
    if (clip.frames.empty()) throw Error(path + ": none of the sampled frames could be decoded (the file is damaged)");
    if (clip.frames.size() < wanted.size()) {
        clip.warnings.push_back(path + ": only " + std::to_string(clip.frames.size()) + " of " +
                                std::to_string(wanted.size()) + " sampled frames could be decoded");
    }
    // What the M-RoPE temporal step is computed from, as python/flexselect/video.py: the requested rate when it was
    // met, else the sampled frames per second of the sampled span.
    const bool all = clip.frames.size() == wanted.size();
    clip.sample_fps = plan.fps_met && all ? opts.fps : (double) clip.frames.size() / plan.span_s;
    return clip;
}

}  // namespace flexselect
