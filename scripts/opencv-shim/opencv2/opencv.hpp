// Stand-in for OpenCV's umbrella header: ffcv includes opencv2/opencv.hpp but uses only
// cv::Mat and cv::resize, so core and imgproc are enough (no need for all of libopencv-dev).
#pragma once
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>
